from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import (
    ConfigError,
    ExperimentConfig,
    LossConfig,
    MarginConfig,
    MarginType,
    Method,
    dump_yaml,
    from_dict,
    load_config,
    val_targets,
)
from orchestrator.metric_names import Metric, validation_key

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_are_shipped_configs() -> None:
    names = {p.stem for p in CONFIGS}
    assert names == {
        "demo",
        "orl_cosface",
        "student_search_demo",
        "tune_demo",
        "webface_r100_to_mbf",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path: Path, tmp_path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, ExperimentConfig)
    copy = tmp_path / "copy.yaml"
    copy.write_text(dump_yaml(config))
    assert load_config(copy) == config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_key_file_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "loss:\n  margn: 0.4\n")
    with pytest.raises(
        ConfigError,
        match=rf"{path}: loss.margn: unknown key in LossConfig \(did you mean 'margin'\?\)",
    ):
        load_config(path)


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, "optim:\n  epochs: ten\n")
    with pytest.raises(
        ConfigError, match=r"exp.yaml: optim.epochs: expected an integer, found 'ten'"
    ):
        load_config(path)
    path = write(tmp_path, "scaling:\n  use_gpu: 1\n")
    with pytest.raises(ConfigError, match=r"scaling.use_gpu: expected true or false"):
        load_config(path)


def test_bad_enum_lists_choices(tmp_path: Path) -> None:
    path = write(tmp_path, "loss:\n  method: proxyles\n")
    with pytest.raises(ConfigError, match=r"loss.method: expected one of 'proxyless', 'scratch'"):
        load_config(path)


def test_contradictory_values_fail(tmp_path: Path) -> None:
    path = write(tmp_path, "student:\n  emb_dim: 128\nteacher:\n  emb_dim: 512\n")
    with pytest.raises(
        ConfigError,
        match=r"student.emb_dim: method proxyless needs student.emb_dim == teacher.emb_dim, found 128 and 512",
    ):
        load_config(path)
    # Fine for scratch: no teacher space involved.
    path = write(tmp_path, "student:\n  emb_dim: 128\nloss:\n  method: scratch\n")
    assert load_config(path).student.emb_dim == 128
    path = write(tmp_path, "optim:\n  epochs: 2\n  warmup_epochs: 3\n")
    with pytest.raises(
        ConfigError, match=r"optim.warmup_epochs: must be in \[0, epochs=2\], found 3"
    ):
        load_config(path)


def test_overrides_are_type_checked_and_applied(tmp_path: Path) -> None:
    path = write(tmp_path, "loss:\n  margin:\n    m: 0.5\n")
    config = load_config(path, ["loss.margin.m=0.45", "loss.margin.type=cosface", "optim.epochs=3"])
    assert config.loss.margin.m == 0.45
    assert config.loss.margin.type is MarginType.COSFACE
    assert config.optim.epochs == 3
    with pytest.raises(
        ConfigError, match=r"with --set: loss.margin.m: expected a number, found 'big'"
    ):
        load_config(path, ["loss.margin.m=big"])
    with pytest.raises(ConfigError, match=r"with --set: loss.nope: unknown key"):
        load_config(path, ["loss.nope=1"])
    with pytest.raises(ConfigError, match=r"expected section.key=value"):
        load_config(path, ["loss.margin"])


def test_old_keys_still_load_with_one_warning_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        "loss:\n  margin: 0.3\n  scale: 32\ndata:\n  endpoint_url: http://127.0.0.1:9\n"
        "tune:\n  metric: val_auc\n  lr_range: [0.01, 0.1]\n",
    )
    config = load_config(path, ["loss.margin=0.45", "loss.margin_type=cosface"])
    assert config.loss.margin == MarginConfig(type=MarginType.COSFACE, scale=32.0, m=0.45)
    assert config.storage.endpoint_url == "http://127.0.0.1:9"
    assert config.tune.metric == Metric.AUC.value and config.tune.space.lr.range == (0.01, 0.1)
    warnings = capsys.readouterr().err.splitlines()
    assert f"warning: {path}: loss.scale is deprecated; write loss.margin.scale" in warnings
    assert f"warning: {path}: data.endpoint_url is deprecated; write storage.endpoint_url" in (
        warnings
    )
    assert "warning: --set: loss.margin is deprecated; write loss.margin.m" in warnings
    assert "warning: --set: loss.margin_type is deprecated; write loss.margin.type" in warnings
    # The same setting under its old and its new key is refused, not resolved silently.
    both = write(tmp_path, "loss:\n  scale: 32\n  margin:\n    scale: 16\n")
    with pytest.raises(ConfigError, match=r"loss.scale and loss.margin.scale are the same"):
        load_config(both)


def test_yaml_numbers_duplicates_and_non_finite_values(tmp_path: Path) -> None:
    path = write(tmp_path, "optim:\n  lr: 1e-4\n  weight_decay: 5E-4\n")
    assert load_config(path).optim.lr == 1e-4 and load_config(path).optim.weight_decay == 5e-4
    assert load_config(None, ["optim.lr=2e-3"]).optim.lr == 2e-3
    twice = write(tmp_path, "loss:\n  method: scratch\noptim:\n  lr: 0.1\nloss:\n  method: l2\n")
    with pytest.raises(ConfigError, match=r"key 'loss' appears twice \(lines 1 and 5\)"):
        load_config(twice)
    with pytest.raises(ConfigError, match=r"optim.lr: expected a finite number, found inf"):
        load_config(None, ["optim.lr=.inf"])


def test_python_construction_is_validated_too() -> None:
    with pytest.raises(ValueError, match="scale: must be > 0"):
        LossConfig(margin=MarginConfig(scale=0.0))
    cfg = from_dict(LossConfig, {"method": "proxyless+l2", "l2_weight": 2})
    assert cfg.method is Method.PROXYLESS_L2 and cfg.l2_weight == 2.0
    with pytest.raises(ConfigError, match=r"l2_weight: method proxyless\+l2 needs l2_weight > 0"):
        from_dict(LossConfig, {"method": "proxyless+l2", "l2_weight": 0})


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "loss: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping for LossConfig"):
        load_config(write(tmp_path, "loss: 3\n"))


def test_sharded_mode_needs_proxyless(tmp_path: Path) -> None:
    path = write(tmp_path, "sharding:\n  mode: sharded\nloss:\n  method: l2\n")
    with pytest.raises(
        ConfigError,
        match=r"sharding.mode: sharded is implemented for loss.method proxyless, found l2",
    ):
        load_config(path)


def test_sample_rate_range(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sharding.sample_rate: must be in \(0, 1\], found 1.5"):
        load_config(write(tmp_path, "sharding:\n  sample_rate: 1.5\n"))


def test_method_facts() -> None:
    """The one table of what each method needs (DESIGN.md section 3), written out by hand."""
    facts = {
        # method: (inherits W, uses W, teacher embeddings, teacher's width, shardable)
        Method.PROXYLESS: (True, True, False, True, True),
        Method.PROXYLESS_L2: (True, True, True, True, False),
        Method.SCRATCH: (False, False, False, False, False),
        Method.L2: (False, False, True, True, False),
        Method.LOGIT: (False, True, True, False, False),
        Method.CCKD: (False, False, True, True, False),
        Method.MULTISTEP: (False, False, True, True, False),
    }
    assert set(facts) == set(Method)
    for method, expected in facts.items():
        got = (
            method.inherits_classifier,
            method.uses_teacher_classifier,
            method.needs_teacher_embeddings,
            method.needs_teacher_width,
            method.shardable,
        )
        assert got == expected, method


@pytest.mark.parametrize("method", list(Method))
def test_student_width_rule_follows_the_method(method: Method) -> None:
    student, teacher = {"emb_dim": 128}, {"emb_dim": 512}
    data = {"loss": {"method": method.value}, "student": student, "teacher": teacher}
    if method in (Method.LOGIT, Method.SCRATCH):
        assert from_dict(ExperimentConfig, data).student.emb_dim == 128
    else:
        with pytest.raises(ConfigError, match=r"needs student\.emb_dim == teacher\.emb_dim"):
            from_dict(ExperimentConfig, data)


def test_real_data_configs_need_no_synthetic_section() -> None:
    config = from_dict(ExperimentConfig, {"data": {"image_size": 96}})
    assert config.data.image_size == 96 and config.synthetic.image_size == 112


def test_options_without_effect_are_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"sharding.sample_rate: 0.1 has no effect with sharding.mode dense"
    ):
        load_config(None, ["sharding.mode=dense", "sharding.sample_rate=0.1"])
    with pytest.raises(
        ConfigError, match=r"and loss.method scratch: negative sampling exists only"
    ):
        load_config(None, ["loss.method=scratch", "sharding.sample_rate=0.1"])
    assert (
        load_config(
            None, ["sharding.mode=sharded", "sharding.sample_rate=0.1"]
        ).sharding.sample_rate
        == 0.1
    )


def test_val_targets_resolve_and_name_the_metrics_they_add() -> None:
    config = load_config(
        None,
        [
            "data.val_dir=s3://bucket/bench",
            "run.val_targets=[lfw, /data/cfp_fp.bin]",
            "tune.metric=lfw_acc",
            "retrain.metric=cfp_fp_acc",
            "run.best_metric=auc",
        ],
    )
    assert val_targets(config) == {"lfw": "s3://bucket/bench/lfw.bin", "cfp_fp": "/data/cfp_fp.bin"}
    assert validation_key(config.tune.metric) == "val_lfw_acc"
    with pytest.raises(
        ConfigError, match=r"tune\.metric: expected one of .*lfw_acc.*found 'agedb_30_acc'"
    ):
        load_config(None, ["data.val_dir=/b", "run.val_targets=[lfw]", "tune.metric=agedb_30_acc"])
    with pytest.raises(
        ConfigError, match=r"run\.val_targets: 'lfw': a bare name needs data\.val_dir"
    ):
        load_config(None, ["run.val_targets=[lfw]"])
    with pytest.raises(ConfigError, match="two targets have one name"):
        load_config(None, ["data.val_dir=/b", "run.val_targets=[lfw, /other/lfw.bin]"])


def test_an_ijb_gate_needs_retrain_ijb() -> None:
    config = load_config(None, ["retrain.ijb=/data/IJBC", "retrain.metric=IJBC_tar_at_far_1e-4"])
    assert config.retrain.metric == "IJBC_tar_at_far_1e-4"
    with pytest.raises(
        ConfigError, match=r"retrain\.metric: expected one of .*found 'IJBC_tar_at_far_1e-4'"
    ):
        load_config(None, ["retrain.metric=IJBC_tar_at_far_1e-4"])
    with pytest.raises(ConfigError, match=r"retrain\.ijb_set: expected one of"):
        load_config(None, ["retrain.ijb_set=IJBA"])


def test_an_elastic_worker_count_is_a_range_and_the_batch_splits_over_every_size(
    tmp_path: Path,
) -> None:
    text = "scaling:\n  num_workers: [2, 4]\noptim:\n  batch_size: 24\n"
    path = write(tmp_path, text + "teacher_optim:\n  batch_size: 12\n")
    scaling = load_config(path).scaling
    assert scaling.elastic and (scaling.min_workers, scaling.max_workers) == (2, 4)
    assert list(scaling.world_sizes) == [2, 3, 4] and scaling.describe() == "2-4"
    fixed = load_config(path, ["scaling.num_workers=3"]).scaling
    assert not fixed.elastic and (fixed.min_workers, fixed.max_workers) == (3, 3)
    # 32 splits over 2 and 4 workers, not over 3: the global batch would change there.
    with pytest.raises(
        ConfigError,
        match=r"optim.batch_size: the global batch 32 must split evenly over every world "
        r"size of scaling.num_workers=2-4; it does not over 3",
    ):
        load_config(path, ["optim.batch_size=32"])
    for bad, message in (
        (
            "[4, 2]",
            r"scaling.num_workers: expected a count or \[min, max\] with 1 <= min <= max, found \[4, 2\]",
        ),
        ("[1, 2, 3]", r"found \[1, 2, 3\]"),
        ("[0, 2]", r"found \[0, 2\]"),
        ("[1, two]", r"scaling.num_workers\[1\]: expected an integer, found 'two'"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(path, [f"scaling.num_workers={bad}"])
    round_trip = from_dict(ExperimentConfig, dump_yaml_data(load_config(path)))
    assert round_trip.scaling.num_workers == (2, 4)


def dump_yaml_data(config: ExperimentConfig) -> dict:
    import yaml

    return yaml.safe_load(dump_yaml(config))


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"compare": {"seeds": [0, -1]}}, "compare.seeds"),
        ({"tune": {"space": {"seed": [3, -2]}}}, "tune.space.seed"),
        ({"synthetic": {"seed": -5}}, "synthetic.seed"),
    ],
)
def test_seeds_outside_64_bits_are_refused_at_load(data: dict[str, Any], key: str) -> None:
    with pytest.raises(
        ConfigError, match=rf"{re.escape(key)}: a seed must be in \[0, 2\*\*63 - 1\]"
    ):
        from_dict(ExperimentConfig, data)
    assert from_dict(ExperimentConfig, {"seed": 2**63 - 1}).seed == 2**63 - 1
