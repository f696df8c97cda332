"""The demo's plan (its sizes and pipeline sections, from demo-plans/*.toml) and its step bookkeeping
(demo.json: what finished, so a rerun skips it)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from whistle_pipeline.config import ConfigError, load_config
from whistle_pipeline.errors import WhistleError

log = logging.getLogger("stages.demo")  # the steps are logged as the demo's

STATE = "demo.json"
PLANS = Path(__file__).with_name("demo-plans")  # full.toml, quick.toml
PLAN_SECTIONS = ("tle", "train_tle", "finetune", "evaluate")  # the pipeline sections a plan may set


@dataclass(frozen=True)
class Plan:
    """How big the demo is: a plan file's [demo] sizes and its pipeline sections. Sentences are the first N
    lines of each examples/ file (target_dev: the N after target_train's)."""

    source_train: int  # paired source clips from the templates: the TLE's training data and the arms' audio steps
    source_lexicon: int  # + this many lexicon sentences (examples/source/lexicon.txt) in the same paired set
    source_test: int
    target_train: int  # target sentences: the text corpus, and the same sentences as TTS speech
    target_test: int
    target_dev: int  # target sentences after the training ones, as eSpeak speech: the fusion weights' dev set
    seeds: int  # runs of every training arm (finetune.seed 0, 1, ...): the spread of each arm's figures
    aided_seeds: int  # the whistle arm's first runs also decoded with a prompt and with fusion (<= seeds)
    tle: dict[str, Any]  # [tle] settings
    train_tle: dict[str, Any]  # [train_tle] settings
    finetune: dict[str, Any]  # [finetune] settings shared by the arms
    evaluate: dict[str, Any]  # [evaluate] settings

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read and check a plan file: [demo] must give every size (whole numbers >= 0) and nothing else;
        the other sections must be among PLAN_SECTIONS and pass `load_config` over pipeline.toml's defaults.
        Raises ConfigError listing every problem."""
        try:
            with open(path, "rb") as handle:
                values = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError([f"cannot read the demo plan {path}: {err}"], str(path)) from err
        sizes = values.pop("demo", {})
        names = [f.name for f in dataclasses.fields(cls) if f.name not in PLAN_SECTIONS]
        problems = [f"[demo] has no key {key!r}; it takes {', '.join(names)}" for key in sizes if key not in names]
        problems += [f"[demo] {name} is missing" for name in names if name not in sizes]
        problems += [
            f"[demo] {name} = {sizes[name]!r} should be a whole number >= 0"
            for name in names
            if name in sizes and (type(sizes[name]) is not int or sizes[name] < 0)
        ]
        problems += [
            f"[demo] {name} = 0: at least 1 is needed"
            for name in ("seeds", "aided_seeds", "target_dev")
            if sizes.get(name) == 0
        ]
        aided, seeds = sizes.get("aided_seeds"), sizes.get("seeds")
        if type(aided) is int and type(seeds) is int and aided > seeds:
            problems.append(f"[demo] aided_seeds = {aided} exceeds seeds = {seeds}")
        problems += [
            f"a plan sets only [demo] and [{'], ['.join(PLAN_SECTIONS)}], not [{section}]"
            for section in values
            if section not in PLAN_SECTIONS
        ]
        try:
            load_config(updates={section: keys for section, keys in values.items() if section in PLAN_SECTIONS})
        except ConfigError as err:
            problems += err.problems
        if problems:
            raise ConfigError(problems, str(path))
        return cls(
            **{name: sizes[name] for name in names}, **{section: values.get(section, {}) for section in PLAN_SECTIONS}
        )


class Steps:
    """demo.json: the plan and the steps that finished (with their seconds and results), written after each."""

    def __init__(self, workdir: Path, plan: Plan, quick: bool, overrides: Sequence[str]):
        self.path = workdir / STATE
        identity = {"quick": quick, "plan": asdict(plan), "overrides": list(overrides)}
        self.state: dict[str, Any] = {**identity, "steps": {}}
        if self.path.exists():
            previous = json.loads(self.path.read_text())
            if {k: previous.get(k) for k in identity} != identity:
                raise WhistleError(
                    f"{workdir} holds a demo run with other settings ({'quick' if previous.get('quick') else 'full'}, "
                    f"overrides {previous.get('overrides')}): use another --workdir, or delete {workdir} to start over"
                )
            self.state = previous
        self.skipped: list[str] = []

    def run(self, name: str, what: str, action: Callable[[], Any]) -> Any:
        """Run `action` unless `name` finished before; returns its recorded result (a JSON-able value)."""
        if name in self.state["steps"]:
            log.info("demo %s: %s — done by an earlier run, skipped", name, what)
            self.skipped.append(name)
            return self.state["steps"][name]["result"]
        log.info("demo %s: %s", name, what)
        started = time.perf_counter()
        result = action()
        self.state["steps"][name] = {"seconds": round(time.perf_counter() - started, 1), "result": result}
        self.path.write_text(json.dumps(self.state, indent=2) + "\n")
        log.info("demo %s: done in %.0f s", name, self.state["steps"][name]["seconds"])
        return result

    def seconds(self) -> dict[str, float]:
        return {name: step["seconds"] for name, step in self.state["steps"].items()}
