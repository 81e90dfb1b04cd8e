"""`omni-ray train CONFIG [key=value ...]` and `omni-ray make-tiny [key=value ...]`."""

from __future__ import annotations

import argparse
import json
import sys

from omni_ray.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omni-ray", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run the online round loop (locally, or inside `ray job submit`)")
    t.add_argument("config", nargs="?", help="YAML config (configs/local_tiny.yaml); defaults when omitted")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. loss.beta=3.5 run.rounds=5")
    m = sub.add_parser("make-tiny", help="build the offline tiny model + tokenizer at model.path (warm-started)")
    m.add_argument("config", nargs="?", help="YAML config whose model.* / data.* / run.seed to use")
    m.add_argument("overrides", nargs="*")
    return p


def _split(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """A first positional with '=' is an override, not a file (`omni-ray train loss.beta=2` works too)."""
    if config is not None and "=" in config:
        return None, [config, *overrides]
    return config, overrides


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(*_split(args.config, args.overrides))
    except ConfigError as exc:
        print(f"omni-ray: config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "make-tiny":
        from omni_ray.driver import ensure_model

        cfg.model.build_tiny_if_missing = True
        print(ensure_model(cfg))
        return 0
    from omni_ray.driver import train

    summary = train(cfg)
    print(json.dumps({k: summary[k] for k in ("rounds_completed", "initial_eval", "final_eval", "wall_s")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
