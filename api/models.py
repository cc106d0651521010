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


class KeySet(BaseModel):
    keys: list[str] = Field(default=[], description="keys of the set", max_length=MAX_KEYS)
    prefix: str | None = Field(default=None, description="and every key whose name starts with this",
                               max_length=MAX_KEY_BYTES)


class ReachQuery(KeySet):
    last: Union[str, int, None] = Field(default=None, description="e.g. 15m, 24h, 30d, or a number of buckets")
    start: Union[float, str, None] = Field(default=None, description="epoch seconds or ISO-8601")
    end: Union[float, str, None] = Field(default=None, description="epoch seconds or ISO-8601")


class Reach(BaseModel):
    start: int = Field(description="start of the range covered, epoch seconds (inclusive, bucket-aligned)")
    end: int = Field(description="end of the range covered, epoch seconds (exclusive, bucket-aligned)")
    keys: int = Field(description="keys of the set holding data (the most any shard holds)")
    prefix: str | None
    unique_visitors: int = Field(description="visitors who saw any key of the set (deduplicated reach)")
    impressions: int = Field(description="impressions of all the set's keys, summed")
    frequency: float | None = Field(description="average impressions per unique visitor")
    relative_error: float = Field(description="relative standard error of unique_visitors")
    interval: list[int | None] = Field(description="95 % interval of unique_visitors")
    exact: bool = Field(description="counted, not estimated")
    partial: bool = Field(description="some shards did not answer: extrapolated, with wider error bars")


class OverlapQuery(BaseModel):
    a: KeySet
    b: KeySet
    last: Union[str, int, None] = Field(default=None, description="e.g. 15m, 24h, 30d, or a number of buckets")
    start: Union[float, str, None] = Field(default=None, description="epoch seconds or ISO-8601")
    end: Union[float, str, None] = Field(default=None, description="epoch seconds or ISO-8601")


class Side(BaseModel):
    unique_visitors: int
    relative_error: float
    interval: list[int | None] = Field(description="95 % interval")
    exact: bool
    impressions: int | None = None


class Both(BaseModel):
    unique_visitors: int = Field(description="visitors of both A and B (clipped at 0)")
    standard_error: float
    relative_error: float | None = Field(description="standard error / estimate (null when the estimate is 0)")
    interval: list[int] = Field(description="95 % interval")
    method: str = Field(description="joint-mle (Ertl's joint maximum likelihood on the two sketches), "
                                    "inclusion-exclusion, or coupons (every part sparse: near-exact)")
    inclusion_exclusion: int = Field(description="|A| + |B| - |A or B|, for comparison")


class Overlap(BaseModel):
    start: int
    end: int
    a: Side
    b: Side
    union: Side
    both: Both
    jaccard: float = Field(description="|A and B| / |A or B|")
    jaccard_interval: list[float]
    share_of_a: float | None = Field(description="share of A's visitors who also saw B")
    share_of_b: float | None = Field(description="share of B's visitors who also saw A")
    distinguishable: bool = Field(description="false when the 95 % interval of the overlap reaches 0: too small "
                                              "to tell from no overlap at this precision")
    note: str | None
    exact: bool
    partial: bool


class RollingPoint(BaseModel):
    start: int
    end: int
    unique_visitors: int
    impressions: int
    relative_error: float
    interval: list[int | None]
    exact: bool
    partial: bool
    complete: bool = Field(description="false for a window that ends after now (its last step is still filling)")


class Rolling(BaseModel):
    keys: list[str | None]
    prefix: str | None
    step: int = Field(description="seconds between points")
    window: int | None = Field(description="seconds per window (null: cumulative since the start)")
    cumulative: bool
    start: int
    end: int
    points: list[RollingPoint]


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
