"""ray-cluster.yaml: valid against the schema inside the installed ray
package (offline), and every command it runs exists in this project."""

import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _config():
    return yaml.safe_load((ROOT / "ray-cluster.yaml").read_text())


def test_valid_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config  # ray==2.60 is pinned
    cfg = prepare_config(_config())
    validate_config(cfg)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    workers = cfg["available_node_types"]["shard_worker"]
    assert 0 < workers["min_workers"] < workers["max_workers"] <= cfg["max_workers"]


def test_the_commands_it_runs_exist_here():
    from impressions.cluster.cli import main as cli_main  # noqa: F401 - importable
    cfg = _config()
    commands = cfg["setup_commands"] + cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    cli = (ROOT / "cluster" / "cli.py").read_text()
    seen_impressions = False
    for command in commands:
        lex = shlex.shlex(command, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        parts, cur = [], []
        for tok in lex:
            if tok in ("&&", ";", "||"):
                parts.append(cur)
                cur = []
            else:
                cur.append(tok)
        parts.append(cur)
        for words in parts:
            if words and words[0].endswith("impressions"):
                seen_impressions = True
                sub = next(w for w in words[1:] if not w.startswith("-") and w != "auto")
                assert f'sub.add_parser("{sub}"' in cli, f"`impressions {sub}` is not a command of cluster/cli.py"
                for flag in [w for w in words if w.startswith("--")]:
                    assert f'"{flag}"' in cli, f"`{flag}` is not an option of cluster/cli.py"
            if "pip" in words and "-e" in words:
                assert words[words.index("-e") + 1] == "~/impressions"
    assert seen_impressions
    for local in cfg["file_mounts"].values():
        path = ROOT / local
        assert path.exists() or (ROOT / (local + ".example")).exists(), f"file_mounts source {local} missing"
    example = (ROOT / "impressions.env.example").read_text()
    assert "IMPRESSIONS_STORAGE=s3://" in example and "IMPRESSIONS_API_KEYS=" in example


def test_safe_by_default():
    cfg = _config()
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0:8265" not in head
    example = (ROOT / "impressions.env.example").read_text()
    assert "RAY_AUTH_MODE=token" in example and "RAY_AUTH_TOKEN=" in example
    from impressions.cluster.config import placeholder_secrets
    env = dict(line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#"))
    assert placeholder_secrets(env) == ["IMPRESSIONS_API_KEYS", "RAY_AUTH_TOKEN"]  # refused until replaced
    import pytest

    from impressions.api.auth import parse_api_keys
    with pytest.raises(ValueError, match="placeholder"):
        parse_api_keys(env["IMPRESSIONS_API_KEYS"])
