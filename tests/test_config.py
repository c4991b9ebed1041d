"""Run configuration: overrides, type coercion, errors naming the key, shipped recipes."""

from __future__ import annotations

import shlex
from importlib import resources
from pathlib import Path

import pytest

from medtune.config import (
    AdapterConfig,
    ConfigError,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    load_config,
)

REQUIRED = ["model.name_or_path=some/model", "data.train=train.jsonl"]
CONFIG_DIR = Path(str(resources.files("medtune") / "configs"))
REPO_ROOT = Path(__file__).resolve().parents[1]


def test_defaults_with_only_required_keys():
    cfg = load_config(None, REQUIRED)
    assert cfg == RunConfig(
        model=ModelConfig(name_or_path="some/model"),
        data=DataConfig(train="train.jsonl"),
        adapter=AdapterConfig(),
        train=TrainConfig(),
    )
    assert cfg.train.learning_rate == 2e-4 and cfg.train.report_to == ["tensorboard"]


def test_overrides_dotted_and_short_keys_are_coerced():
    cfg = load_config(None, REQUIRED + [
        "learning_rate=1e-4",
        "adapter.target_modules=q_proj, v_proj",
        "bf16=true",
        "gradient_checkpointing=no",
        "validation=null",
        "save_total_limit=None",
        "max_samples=32",
        "epochs=2",
        "train.report_to=tensorboard,wandb",
        "model.attn_implementation=sdpa",
        "stage=sft",
        "tinit=null",
        "dropout=0",
    ])
    assert cfg.train.learning_rate == 0.0001 and type(cfg.train.learning_rate) is float
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.bf16 is True
    assert cfg.train.gradient_checkpointing is False
    assert cfg.data.validation is None
    assert cfg.train.save_total_limit is None
    assert cfg.data.max_samples == 32 and type(cfg.data.max_samples) is int
    assert cfg.train.epochs == 2.0 and type(cfg.train.epochs) is float
    assert cfg.train.report_to == ["tensorboard", "wandb"]
    assert cfg.model.attn_implementation == "sdpa"
    assert cfg.adapter.tinit is None
    assert cfg.adapter.dropout == 0.0 and type(cfg.adapter.dropout) is float


def test_override_value_may_contain_equals_sign():
    cfg = load_config(None, REQUIRED + ["train.output_dir=runs/a=b"])
    assert cfg.train.output_dir == "runs/a=b"


def test_overrides_beat_yaml_and_yaml_numbers_are_read(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model:\n  name_or_path: m\ndata:\n  train: t.jsonl\ntrain:\n  learning_rate: 1e-4\n  batch_size: 2\n",
        encoding="utf-8",
    )
    cfg = load_config(path)
    assert cfg.train.learning_rate == 0.0001  # YAML 1.1 reads "1e-4" as a string
    assert cfg.train.batch_size == 2
    cfg = load_config(path, ["batch_size=16", "model.name_or_path=other"])
    assert cfg.train.batch_size == 16 and cfg.model.name_or_path == "other"


def test_unknown_dotted_key_suggests_the_close_one():
    with pytest.raises(ConfigError) as exc:
        load_config(None, REQUIRED + ["train.learnig_rate=1e-4"])
    msg = str(exc.value)
    assert "train.learnig_rate" in msg
    assert "did you mean 'train.learning_rate'?" in msg


def test_unknown_key_in_yaml_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name_or_path: m\n  dtyp: bfloat16\ndata:\n  train: t\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"model\.dtyp: unknown key; did you mean 'model\.dtype'\?"):
        load_config(path)


def test_unknown_section_and_short_key():
    with pytest.raises(ConfigError, match="did you mean 'adapter'"):
        load_config(None, REQUIRED + ["adaptor.r=4"])
    with pytest.raises(ConfigError, match=r"override 'learnrate': write it as section\.key \(no section has it\)"):
        load_config(None, REQUIRED + ["learnrate=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, REQUIRED + ["bf16"])


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("batch_size=four", "train.batch_size", "expected an integer"),
        ("train.max_steps=1.5", "train.max_steps", "expected an integer"),
        ("learning_rate=fast", "train.learning_rate", "expected a number"),
        ("bf16=maybe", "train.bf16", "expected true/false"),
        ("max_samples=lots", "data.max_samples", "expected an integer"),
    ],
)
def test_wrong_type_names_the_key(override, key, expected):
    with pytest.raises(ConfigError) as exc:
        load_config(None, REQUIRED + [override])
    assert str(exc.value).startswith(f"{key}: {expected}")


def test_wrong_type_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name_or_path: m\ndata:\n  train: t\ntrain:\n  bf16: [1]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^train\.bf16: expected true/false"):
        load_config(path)
    path.write_text("model: gpt2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^model: expected a mapping"):
        load_config(path)
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a YAML mapping at the top level"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("adapter.method=foo", r"^adapter\.method: expected one of \['lora', 'adalora', 'full', 'qlora', 'prefix', 'prompt'\], got 'foo'"),
        ("model.dtype=fp8", r"^model\.dtype: expected one of"),
        ("data.on_invalid=ignore", r"^data\.on_invalid: expected one of \['error', 'skip'\]"),
        ("stage=ppo", r"^stage: expected one of \['pt', 'sft', 'rm', 'dpo', 'rl'\]"),
        ("val_fraction=1.0", r"^data\.val_fraction: expected 0 <= x < 1"),
        ("learning_rate=0", r"^train\.learning_rate: must be > 0"),
        ("adapter.r=0", r"^adapter\.r: must be > 0"),
        ("max_length=-1", r"^data\.max_length: must be > 0"),
    ],
)
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, REQUIRED + [override])


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        # trained an all-NaN adapter and exited 0
        (["learning_rate=inf"], r"^train\.learning_rate: expected a finite number, got 'inf'$"),
        # crashed inside torch's optimiser
        (["learning_rate=nan"], r"^train\.learning_rate: expected a finite number, got 'nan'$"),
        (["learning_rate=-1e-4"], r"^train\.learning_rate: must be > 0, got -0\.0001$"),
        # wrote an untrained run and exited 0
        (["epochs=0"], r"^train\.epochs: must be > 0 \(or set train\.max_steps >= 1\), got 0\.0$"),
        (["epochs=-1", "max_steps=10"], r"^train\.epochs: must be > 0 .*got -1\.0$"),
        (["max_steps=0"], r"^train\.max_steps: expected a number of optimiser steps >= 1, or -1 .*got 0$"),
        (["max_steps=-5"], r"^train\.max_steps: .*got -5$"),
        (["batch_size=0"], r"^train\.batch_size: must be > 0, got 0$"),
        (["eval_batch_size=0"], r"^train\.eval_batch_size: must be > 0, got 0$"),
        (["logging_steps=0"], r"^train\.logging_steps: must be > 0, got 0$"),
        (["warmup_ratio=1"], r"^train\.warmup_ratio: expected 0 <= x < 1 .*got 1\.0$"),
        (["warmup_ratio=-0.1"], r"^train\.warmup_ratio: expected 0 <= x < 1 .*got -0\.1$"),
        (["max_grad_norm=-1"], r"^train\.max_grad_norm: must be >= 0, got -1\.0$"),
        (["max_grad_norm=inf"], r"^train\.max_grad_norm: expected a finite number, got 'inf'$"),
        (["weight_decay=-0.01"], r"^train\.weight_decay: must be >= 0, got -0\.01$"),
        (["save_total_limit=0"], r"^train\.save_total_limit: expected null \(no limit\) or a number >= 1, got 0$"),
        (["early_stopping_patience=0"], r"^train\.early_stopping_patience: .*got 0$"),
        (["seed=-1"], r"^train\.seed: expected 0 <= seed < 2\*\*32, got -1$"),
        (["max_samples=0"], r"^data\.max_samples: expected null \(no limit\) or a number >= 1, got 0$"),
        (["val_fraction=nan"], r"^data\.val_fraction: expected a finite number, got 'nan'$"),
        (["adapter.alpha=0"], r"^adapter\.alpha: must be > 0, got 0$"),
        (["adapter.dropout=1"], r"^adapter\.dropout: expected 0 <= x < 1, got 1\.0$"),
        (["adapter.method=adalora", "adapter.target_r=16"], r"^adapter\.target_r: must be <= adapter\.init_r \(12\)"),
        (["pt.block_size=0"], r"^pt\.block_size: must be > 0, got 0$"),
        (["preference.beta=0"], r"^preference\.beta: must be > 0, got 0\.0$"),
        (["rl.num_generations=1"], r"^rl\.num_generations: must be >= 2, got 1$"),
        (["rl.temperature=0"], r"^rl\.temperature: must be > 0, got 0\.0$"),
    ],
)
def test_nonsense_numbers_are_refused_naming_key_and_value(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, REQUIRED + overrides)


def test_yaml_infinity_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name_or_path: m\ndata:\n  train: t\ntrain:\n  learning_rate: .inf\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^train\.learning_rate: expected a finite number, got inf$"):
        load_config(path)


def test_max_steps_alone_may_replace_epochs():
    cfg = load_config(None, REQUIRED + ["epochs=0", "max_steps=3"])
    assert cfg.train.max_steps == 3 and cfg.train.epochs == 0.0


def test_bf16_and_fp16_together_rejected():
    with pytest.raises(ConfigError, match="train.bf16 and train.fp16"):
        load_config(None, REQUIRED + ["bf16=true", "fp16=true"])


def test_required_keys():
    with pytest.raises(ConfigError, match=r"^model\.name_or_path: required"):
        load_config(None, ["data.train=t.jsonl"])
    with pytest.raises(ConfigError, match=r"^data\.train: required"):
        load_config(None, ["model.name_or_path=m"])


SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def test_shipped_configs_found():
    names = {p.name for p in SHIPPED}
    assert {"cmexam_adalora_7b.yaml", "cmexam_lora_7b.yaml", "quickstart.yaml"} <= names
    stages = {load_config(p).stage for p in SHIPPED}
    methods = {load_config(p).adapter.method for p in SHIPPED}
    assert "sft" in stages and {"lora", "adalora", "prefix", "prompt"} <= methods


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads_and_its_command_line_works(path):
    cfg = load_config(path)
    assert cfg.stage in ("pt", "sft", "rm", "dpo", "rl")
    assert cfg.model.name_or_path and cfg.data.train
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# medtune train ")
    args = shlex.split(first[len("# medtune train "):])
    # The usage line names this very file and its overrides are valid.
    assert (REPO_ROOT / args[0]).resolve() == path.resolve()
    assert all("=" in a for a in args[1:])
    from_usage = load_config(path, args[1:])
    for item in args[1:]:
        key, value = item.split("=", 1)
        section, leaf = key.split(".")
        got = getattr(getattr(from_usage, section), leaf)
        # local paths that exist are made absolute by load_config
        expected = str(Path(value).resolve()) if Path(value).exists() else value
        assert str(got).lower() == expected.lower()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_uses_a_shipped_template(path):
    from medtune.templates import available

    assert load_config(path).data.template in available()


def test_save_load_round_trip(tmp_path):
    cfg = load_config(CONFIG_DIR / "cmexam_lora_7b.yaml", [
        "adapter.target_modules=q_proj,v_proj", "save_total_limit=null", "max_samples=100", "tinit=5",
    ])
    path = tmp_path / "run" / "config.yaml"
    cfg.save(path)
    loaded = load_config(path)
    assert loaded == cfg
    assert loaded.adapter.target_modules == ["q_proj", "v_proj"]
    assert loaded.train.save_total_limit is None
    assert loaded.data.validation == "cmexam_val.jsonl"
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]


def test_round_trip_of_defaults(tmp_path):
    cfg = load_config(None, REQUIRED)
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_all_linear_stays_a_string():
    from medtune.config import load_config

    base = ["model.name_or_path=m", "data.train=t.jsonl"]
    assert load_config(None, [*base, "adapter.target_modules=all-linear"]).adapter.target_modules == "all-linear"
    assert load_config(None, [*base, "adapter.target_modules=q_proj,v_proj"]).adapter.target_modules == [
        "q_proj", "v_proj"]


STAGE_RECIPES = {"pt": "pt_lora_tiny.yaml", "sft": "quickstart.yaml", "rm": "rm_lora_tiny.yaml",
                 "dpo": "dpo_lora_tiny.yaml", "rl": "rl_grpo_exam_tiny.yaml"}


@pytest.mark.parametrize("stage", sorted(STAGE_RECIPES))
@pytest.mark.parametrize("method", ["full", "lora", "adalora", "qlora", "prefix", "prompt"])
def test_every_stage_recipe_takes_every_method(stage, method):
    """The stage × method matrix: each stage's recipe with each method override is a valid config
    (one recipe per stage ships; methods are switched with adapter.method=…)."""
    from medtune.adapters import check_method_compatibility
    from medtune.models import GPURequired

    cfg = load_config(CONFIG_DIR / STAGE_RECIPES[stage], [f"adapter.method={method}",
                                                         "train.gradient_checkpointing=false"])
    assert cfg.stage == stage and cfg.adapter.method == method
    import torch

    if method == "qlora" and not torch.cuda.is_available():
        with pytest.raises(GPURequired):  # refused on CPU before anything is loaded
            check_method_compatibility(cfg.adapter, cfg.train)
    else:
        check_method_compatibility(cfg.adapter, cfg.train)


@pytest.mark.parametrize(
    ("override", "field", "expected"),
    [
        ("adapter.target_modules=[q_proj,v_proj]", "target_modules", ["q_proj", "v_proj"]),
        ("adapter.target_modules=[q_proj, v_proj]", "target_modules", ["q_proj", "v_proj"]),
        ("adapter.target_modules=['q_proj', \"v_proj\"]", "target_modules", ["q_proj", "v_proj"]),
        ("adapter.target_modules=[q_proj]", "target_modules", ["q_proj"]),  # a list, not the name "[q_proj]"
        ("train.report_to=[tensorboard,wandb]", "report_to", ["tensorboard", "wandb"]),
        ("train.report_to=[]", "report_to", []),
    ],
)
def test_list_overrides_in_bracket_form(override, field, expected):
    cfg = load_config(None, REQUIRED + [override])
    section = cfg.adapter if override.startswith("adapter.") else cfg.train
    assert getattr(section, field) == expected


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("adapter.target_modules=[]", r"^adapter\.target_modules: empty \(\[\]\); write null"),
        ("adapter.target_modules=[q_proj,[v_proj]]", r"^adapter\.target_modules: expected a list of names"),
        ("adapter.target_modules=[q_proj, v: x]", r"^adapter\.target_modules: expected a list of names"),
    ],
)
def test_bad_bracket_lists_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, REQUIRED + [override])


def test_training_settings_are_read():
    cfg = load_config(None, REQUIRED + [
        "warmup_steps=10", "eval_steps=25", "save_steps=25", "load_best_model_at_end=true",
        "metric_for_best_model=accuracy", "eval_accuracy=generate", "eval_max_new_tokens=16", "val_fraction=0.1",
    ])
    t = cfg.train
    assert (t.warmup_steps, t.eval_steps, t.load_best_model_at_end) == (10, 25, True)
    assert (t.metric_for_best_model, t.eval_accuracy, t.eval_max_new_tokens) == ("accuracy", "generate", 16)
    # what the Trainer gets: step-wise evaluation, checkpoints on the same steps, accuracy maximised
    from medtune.train.common import evaluation_arguments, training_arguments

    assert evaluation_arguments(cfg, has_val=True) == {
        "eval_strategy": "steps", "eval_steps": 25, "load_best_model_at_end": True,
        "metric_for_best_model": "eval_accuracy", "greater_is_better": True}
    args = training_arguments(cfg, Path("run"), has_val=True)
    assert args["warmup_steps"] == 10 and args["save_steps"] == 25
    # defaults: once per epoch, no best-checkpoint loading; load_best alone evaluates at every checkpoint
    plain = load_config(None, REQUIRED + ["val_fraction=0.1"])
    assert evaluation_arguments(plain, has_val=True) == {"eval_strategy": "epoch"}
    best = load_config(None, REQUIRED + ["val_fraction=0.1", "load_best_model_at_end=true"])
    assert evaluation_arguments(best, has_val=True) == {
        "eval_strategy": "steps", "eval_steps": 50, "load_best_model_at_end": True,
        "metric_for_best_model": "eval_loss", "greater_is_better": False}
    with pytest.raises(ConfigError, match=r"^train\.load_best_model_at_end: the run has no validation examples"):
        evaluation_arguments(best, has_val=False)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["warmup_steps=-1"], r"^train\.warmup_steps: expected a number of optimiser steps >= 0, got -1$"),
        (["warmup_steps=10", "warmup_ratio=0.1"], r"^train\.warmup_steps \(10\) and train\.warmup_ratio \(0\.1\): "
                                                  r"choose one$"),
        (["eval_steps=0", "val_fraction=0.1"], r"^train\.eval_steps: expected null \(once per epoch\) or .*got 0$"),
        (["eval_steps=10"], r"^train\.eval_steps: needs a validation set to evaluate on; set data\.validation"),
        (["load_best_model_at_end=true"], r"^train\.load_best_model_at_end: needs a validation set"),
        (["load_best_model_at_end=true", "val_fraction=0.1", "eval_steps=20", "save_steps=50"],
         r"^train\.load_best_model_at_end: needs a checkpoint at every evaluation; set train\.save_steps equal to "
         r"train\.eval_steps \(now 50 and 20\)"),
        (["eval_accuracy=sometimes", "val_fraction=0.1"], r"^train\.eval_accuracy: expected one of \['none', 'loglik', "
                                                          r"'generate'\]"),
        (["eval_accuracy=loglik"], r"^train\.eval_accuracy: needs a validation set"),
        (["eval_accuracy=loglik", "val_fraction=0.1", "stage=dpo"], r"^train\.eval_accuracy: .*stage sft only "
                                                                    r"\(got stage dpo\)$"),
        (["load_best_model_at_end=true", "stage=rl"], r"^train\.load_best_model_at_end: stage rl does not evaluate"),
        (["metric_for_best_model=eval_accuracy", "val_fraction=0.1"],
         r"^train\.metric_for_best_model: eval_accuracy is logged only with train\.eval_accuracy=loglik or generate"),
        (["metric_for_best_model=bleu"], r"^train\.metric_for_best_model: stage sft logs \['eval_loss', "
                                         r"'eval_accuracy'\], got 'bleu'$"),
        (["metric_for_best_model=accuracy", "stage=pt"], r"^train\.metric_for_best_model: stage pt logs \['eval_loss'\]"),
        (["eval_max_new_tokens=0"], r"^train\.eval_max_new_tokens: must be > 0, got 0$"),
    ],
)
def test_training_setting_combinations_that_cannot_work(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, REQUIRED + overrides)
