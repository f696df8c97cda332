"""The configuration loader: defaults only in pipeline.toml, layered overrides, every problem at once."""

from __future__ import annotations

import dataclasses
import glob
import os
from pathlib import Path

import pytest

from stages.demo_plan import PLAN_SECTIONS, Plan
from whistle_pipeline.config import (
    DEFAULT_CONFIG_PATH,
    SECTIONS,
    ConfigError,
    PipelineConfig,
    load_config,
    parse_override,
)

REPO = Path(__file__).resolve().parents[1]


def test_packaged_defaults_are_the_top_level_pipeline_toml():
    assert DEFAULT_CONFIG_PATH.resolve() == (REPO / "pipeline.toml").resolve()


def test_defaults_define_every_field_and_load():
    config = load_config()
    assert isinstance(config, PipelineConfig)
    assert set(config.to_dict()) == {
        "teacher",
        "data",
        "store",
        "precompute",
        "tle",
        "train_tle",
        "finetune",
        "evaluate",
    }
    assert config.store.frames == "speech"
    assert config.teacher.name_or_path == "openai/whisper-large-v3"


def test_every_key_in_pipeline_toml_is_commented():
    """Each key line is preceded by a comment line (its meaning and unit)."""
    lines = (REPO / "pipeline.toml").read_text().splitlines()
    uncommented = []
    for i, line in enumerate(lines):
        if "=" in line and not line.lstrip().startswith("#"):
            j = i - 1
            while j >= 0 and "=" in lines[j] and not lines[j].lstrip().startswith("#"):
                j -= 1  # a group of related keys shares the comment above it
            if j < 0 or not lines[j].lstrip().startswith("#"):
                uncommented.append(line)
    assert uncommented == []


SHIPPED_CONFIGS = sorted(
    path
    for path in glob.glob(str(REPO / "**" / "*.toml"), recursive=True)
    if Path(path).name != "pyproject.toml" and "/.ci/" not in path and "/build/" not in path
)


def test_shipped_configs_are_found():
    assert str(REPO / "pipeline.toml") in SHIPPED_CONFIGS


DEMO_PLANS = REPO / "stages" / "demo-plans"


def test_the_demo_plans_are_shipped_configs():
    assert {Path(path).name for path in SHIPPED_CONFIGS if Path(path).parent == DEMO_PLANS} == {
        "full.toml",
        "quick.toml",
    }


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_every_shipped_toml_loads(path):
    """A pipeline config loads with load_config; a demo plan (its pipeline sections checked by the same
    loader, its [demo] sizes by the Plan record) with Plan.load."""
    if Path(path).parent == DEMO_PLANS:
        plan = Plan.load(path)
        assert all(isinstance(getattr(plan, section), dict) for section in PLAN_SECTIONS)
    else:
        config = load_config(path)
        assert isinstance(config, PipelineConfig)


def test_a_demo_plan_reports_every_problem(tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text(
        "[demo]\nsource_train = 8\nsource_tests = 2\ntarget_train = -1\n"
        '[tle]\nhiden_size = 64\n[finetune]\nsteps = "many"\n[store]\nframes = "full"\n'
    )
    with pytest.raises(ConfigError) as caught:
        Plan.load(plan)
    problems = "\n".join(caught.value.problems)
    assert "[demo] has no key 'source_tests'" in problems
    assert "[demo] source_lexicon is missing" in problems and "[demo] source_test is missing" in problems
    assert "[demo] target_train = -1 should be a whole number >= 0" in problems
    assert "unknown key tle.hiden_size (did you mean 'hidden_size'?)" in problems
    assert "finetune.steps = 'many' should be" in problems
    assert "not [store]" in problems


def test_a_demo_plan_needs_a_seed_and_aids_on_at_most_every_seed(tmp_path):
    plan = tmp_path / "plan.toml"
    sizes = "source_train = 8\nsource_lexicon = 0\nsource_test = 2\ntarget_train = 4\ntarget_test = 2\n"
    plan.write_text(f"[demo]\n{sizes}target_dev = 0\nseeds = 1\naided_seeds = 2\n")
    with pytest.raises(ConfigError) as caught:
        Plan.load(plan)
    problems = "\n".join(caught.value.problems)
    assert "[demo] target_dev = 0: at least 1 is needed" in problems
    assert "[demo] aided_seeds = 2 exceeds seeds = 1" in problems
    plan.write_text(f"[demo]\n{sizes}target_dev = 1\nseeds = 2\naided_seeds = 1\n")
    assert (Plan.load(plan).seeds, Plan.load(plan).aided_seeds) == (2, 1)


def test_layers_apply_in_order(tmp_path):
    user = tmp_path / "user.toml"
    user.write_text('[store]\nframes = "full"\nshard_size = 10\n[precompute]\nbatch_size = 4\n')
    config = load_config(
        user,
        updates={"precompute": {"batch_size": 8, "num_workers": None}},
        overrides=["store.shard_size=20", "train_tle.learning_rate=1e-3"],
    )
    assert config.store.frames == "full"  # file
    assert config.precompute.batch_size == 8  # flag beats file
    assert config.precompute.num_workers == load_config().precompute.num_workers  # None = flag not given
    assert config.store.shard_size == 20  # --set beats file
    assert config.train_tle.learning_rate == pytest.approx(1e-3)
    assert isinstance(config.train_tle.learning_rate, float)


def test_all_problems_are_reported_at_once_with_suggestions(tmp_path):
    user = tmp_path / "bad.toml"
    user.write_text(
        '[store]\nframe = "full"\nshard_size = 0\n'
        '[precompute]\nbatch_size = "big"\n'
        "[tle]\nnum_heads = 5\n"
        "[trian_tle]\nsteps = 3\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(user, overrides=["store.codec=zip", "nonsense"])
    problems = info.value.problems
    text = str(info.value)
    assert len(problems) == 7, problems
    assert "unknown key store.frame (did you mean 'frames'?)" in text
    assert "unknown section [trian_tle] (did you mean 'train_tle'?)" in text
    assert "store.shard_size = 0 is below its minimum 1" in text
    assert "precompute.batch_size = 'big' should be an integer" in text
    assert "tle.hidden_size = 384 is not divisible by tle.num_heads = 5" in text
    assert "store.codec = 'zip' should be one of 'blosc-lz4', 'blosc-zstd', 'none'" in text
    assert "not of the form section.key=value" in text


def test_cross_field_rules(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(
            overrides=[
                "train_tle.warmup_steps=50",
                "train_tle.steps=10",
                "store.codec=none",
                "store.bitround_keepbits=7",
            ]
        )
    text = str(info.value)
    assert "train_tle.warmup_steps = 50 must be below train_tle.steps = 10" in text
    assert "BitRound only helps a compressor" in text


def test_the_pronunciation_front_end_is_one_the_tle_knows():
    assert load_config().tle.pronunciation == "none"
    assert load_config(overrides=["tle.pronunciation=espeak"]).tle.pronunciation == "espeak"
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["tle.pronunciation=festival", "tle.phoneme_channels=0"])
    assert "tle.pronunciation = 'festival' should be one of 'none', 'espeak'" in str(info.value)
    assert "tle.phoneme_channels = 0 is below its minimum 1" in str(info.value)


def test_bool_is_not_an_int_and_int_is_a_float():
    with pytest.raises(ConfigError, match="precompute.batch_size = True should be an integer"):
        load_config(overrides=["precompute.batch_size=true"])
    assert load_config(overrides=["finetune.audio_ratio=1"]).finetune.audio_ratio == 1.0


def test_missing_file_and_invalid_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[store\nframes = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


def test_override_values_are_read_as_toml_else_string():
    assert parse_override("store.path=s3://bucket/x") == ("store", "path", "s3://bucket/x")
    assert parse_override("precompute.batch_size=32") == ("precompute", "batch_size", 32)
    assert parse_override('evaluate.models=["a", "b"]') == ("evaluate", "models", ["a", "b"])
    assert parse_override("precompute.strict=true") == ("precompute", "strict", True)


def test_resolved_config_round_trips_through_toml(tmp_path):
    config = load_config(overrides=["store.frames=full", 'data.path="a \\"quoted\\" path ü"', 'evaluate.models=["m1"]'])
    saved = config.save(tmp_path)
    assert saved.name == "config.toml"
    assert load_config(saved) == config


def test_dataclasses_hold_no_defaults():
    for cls in SECTIONS.values():
        for field in dataclasses.fields(cls):
            assert field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING, (
                f"{cls.__name__}.{field.name} has a default in code; defaults belong in pipeline.toml"
            )


def test_configs_are_frozen():
    config = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.store.frames = "full"


def test_inf_and_nan_are_refused_for_every_float_setting_all_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(
            overrides=[
                "finetune.learning_rate=inf",
                "train_tle.kl_beta=nan",
                "finetune.grad_clip=-inf",
                "tle.dropout=+inf",
            ]
        )
    assert sorted(info.value.problems) == [
        "finetune.grad_clip = -inf should be a finite number",
        "finetune.learning_rate = inf should be a finite number",
        "tle.dropout = inf should be a finite number",
        "train_tle.kl_beta = nan should be a finite number",
    ]


def test_a_set_beats_a_flag_for_the_same_key_and_says_so_when_they_differ(caplog):
    """README's layers: flags, then --set. Whatever their order on the command line, --set wins; a warning
    names both values when they differ (none when they agree)."""
    with caplog.at_level("WARNING", logger="whistle_pipeline.config"):
        config = load_config(
            overrides=["precompute.batch_size=8", "store.frames=full"],
            updates={"precompute": {"batch_size": 32}, "store": {"frames": "full"}},
        )
    assert (config.precompute.batch_size, config.store.frames) == (8, "full")
    assert [r.getMessage() for r in caplog.records] == [
        "--set precompute.batch_size=8 overrides the command-line option's 32 (a --set wins over flags)"
    ]
