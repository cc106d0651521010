"""The REST API's request and response models (they are its OpenAPI schema)."""

from typing import Union

from pydantic import BaseModel, Field

MAX_KEYS = 1000  # keys in one question
MAX_KEY_BYTES = 256  # as events.MAX_KEY_BYTES: a longer key can hold no data


class Unique(BaseModel):
    key: str | None = Field(description="the key (null: site-wide)")
    start: int = Field(description="start of the range covered, epoch seconds (inclusive, bucket-aligned)")
    end: int = Field(description="end of the range covered, epoch seconds (exclusive, bucket-aligned)")
    unique_visitors: int
    impressions: int
    relative_error: float = Field(description="relative standard error of unique_visitors")
    interval: list[int | None] = Field(description="95 % interval of unique_visitors")
    exact: bool = Field(description="counted, not estimated")
    partial: bool = Field(description="some shards did not answer: extrapolated, with wider error bars")


class UniqueMany(BaseModel):
    results: list[Unique]


class UniqueQuery(BaseModel):
    keys: list[str | None] = Field(description="keys (null: site-wide)", max_length=MAX_KEYS)
    last: Union[str, int, None] = Field(default=None, description="e.g. 15m, 24h, 30d, or a number of buckets")
    start: Union[float, str, None] = Field(default=None, description="epoch seconds or ISO-8601")
    end: Union[float, str, None] = Field(default=None, description="epoch seconds or ISO-8601")


class Rejected(BaseModel):
    row: int
    reason: str
    value: Union[str, int, float, None] = None
    file: str | None = None


class IngestResult(BaseModel):
    accepted: int
    rejected: int
    rejected_by_reason: dict[str, int]
    errors: list[Rejected] = Field(description="the first few rejected rows, with reasons")


class Series(BaseModel):
    key: str | None
    step: int = Field(description="seconds per point")
    points: list[Unique]


class KeyCount(BaseModel):
    key: str
    impressions: int


class Keys(BaseModel):
    start: int
    end: int
    keys: list[KeyCount] = Field(description="the most impressions first")


class Error(BaseModel):
    error: str


class Health(BaseModel):
    status: str
    shards: int | None = None
    answering: int | None = None


ERRORS = {400: {"model": Error, "description": "bad input: the message says what"},
          401: {"model": Error, "description": "no API key"},
          403: {"model": Error, "description": "an API key without the needed scope"},
          422: {"model": Error, "description": "a parameter of the wrong type"},
          503: {"model": Error, "description": "no shard answered in time"}}
