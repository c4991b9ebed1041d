"""RL stage: exam / overlap / reward-model rewards, and GRPO raising the exam reward of a partly trained model."""

from __future__ import annotations

import json
import re
import shlex
from importlib import resources
from pathlib import Path

import pytest

from medtune.templates import get_template
from medtune.train.rewards import (
    exam_reward,
    has_answer_format,
    make_exam_reward_fn,
    make_reference_overlap_reward_fn,
    reference_overlap_reward,
)

CONFIG_DIR = Path(str(resources.files("medtune") / "configs"))
REPO_ROOT = Path(__file__).resolve().parents[1]
RL_YAML = CONFIG_DIR / "rl_grpo_exam_tiny.yaml"
OPTS = {"A": "胸肌劳损", "B": "流行性胸痛", "C": "带状疱疹", "D": "心绞痛", "E": "肺炎"}
QA = get_template("qa")  # prompt ends with 答案：; explanation marker 理由：


# ---- exam_reward: the table ------------------------------------------------------------------


@pytest.mark.parametrize(("output", "gold", "expected"), [
    ("C\n理由：沿肋间神经分布", "C", 1.1),      # right, well formed → 1 + bonus
    ("C", "C", 1.0),                            # right letters, no 理由： → no bonus
    ("B\n理由：沿肋间神经分布", "C", 0.1),      # wrong but well formed → bonus only
    ("B", "C", 0.0),                            # wrong, no explanation marker
    ("我不知道", "C", 0.0),                      # nothing parses
    ("", "C", 0.0),
    ("AD\n理由：两者皆可", "DA", 1.1),          # multi-answer: exact set, any gold order
    ("A\n理由：只选一个", "AD", 0.1),            # multi-answer: a subset is wrong
    ("ADE\n理由：多选", "AD", 0.1),              # ... and so is a superset
    ("A B C D E\n理由：都有可能", "C", 0.0),    # every option is a hedge: no answer, no bonus
    ("C或D\n理由：两者之一", "C", 0.0),          # alternatives are a hedge too
    ("A D\n理由：两者皆可", "AD", 1.1),          # space-separated multi-answer
    ('{"answer": "C"}', "C", 1.0),              # JSON answer: right, but not the qa layout
    ("C\n理由：沿肋间神经分布，故选D", "C", 0.0),  # later final answer D replaces C: wrong, and
                                                #   the letters no longer come from the answer slot
])
def test_exam_reward_table(output, gold, expected):
    (got,) = exam_reward([output], [OPTS], [gold], QA, format_bonus=0.1)
    assert got == pytest.approx(expected)


def test_exam_reward_format_needs_letters_in_the_answer_region():
    # 理由： is there, but the answer region before it holds no letter: no format bonus.
    assert not has_answer_format("嗯\n理由：C", OPTS, QA)
    assert has_answer_format("C\n理由：", OPTS, QA)
    # A template with an answer marker requires it in the output.
    paper = get_template("cmexam_paper")
    if paper.answer_marker:
        assert not has_answer_format("C", OPTS, paper)


def test_exam_reward_format_marker_inside_reasoning_earns_no_bonus():
    # 理由： only inside <think>: the answer after it is right but not in the template's format
    assert exam_reward(["<think>理由：想一想</think>C"], [OPTS], ["C"], QA) == [1.0]
    assert exam_reward(["<think>想一想</think>C\n理由：颈椎病"], [OPTS], ["C"], QA) == [1.1]


def test_exam_reward_bonus_zero_and_length_check():
    assert exam_reward(["C\n理由：x"], [OPTS], ["C"], QA, format_bonus=0.0) == [1.0]
    with pytest.raises(ValueError):
        exam_reward(["C", "D"], [OPTS], ["C"], QA)


def test_trl_wrapper_reads_dataset_columns_as_kwargs():
    fn = make_exam_reward_fn(QA, 0.1)
    # TRL passes every extra column as a list plus its own extras (trainer_state, log_metric, ...).
    got = fn(prompts=["p", "p"], completions=["C\n理由：x", "B"], completion_ids=[[1], [2]],
             options=[json.dumps(OPTS, ensure_ascii=False)] * 2, answer=["C", "C"],
             trainer_state=None, log_extra=None, log_metric=None)
    assert got == pytest.approx([1.1, 0.0])
    assert fn.__name__ == "exam"


# ---- reference_overlap_reward ------------------------------------------------------------------


def test_reference_overlap_reward_values():
    got = reference_overlap_reward(["食管克罗恩病", "克罗恩病", "感冒", ""], ["食管克罗恩病"] * 4)
    assert got[0] == pytest.approx(1.0)
    # LCS 4 of 6 reference chars, precision 1: CMExam's β-weighted ROUGE-L, not the plain F1.
    rc, p = 4 / 6, 1.0
    beta = p / rc
    assert got[1] == pytest.approx((1 + beta**2) * rc * p / (rc + beta**2 * p), abs=1e-6)
    assert got[2] == 0.0 and got[3] == 0.0
    assert reference_overlap_reward(["x"], [" "]) == [0.0]  # empty reference: nothing to match
    fn = make_reference_overlap_reward_fn()
    assert fn(prompts=["q"], completions=["食管克罗恩病"], reference=["食管克罗恩病"]) == [pytest.approx(1.0)]


# ---- the shipped recipe ------------------------------------------------------------------------


def test_shipped_rl_config_and_its_command_line():
    from medtune.config import load_config

    cfg = load_config(RL_YAML)
    assert cfg.stage == "rl" and cfg.rl.algorithm == "grpo" and cfg.rl.reward == "exam"
    first = RL_YAML.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# medtune train ")
    args = shlex.split(first[len("# medtune train "):])
    assert (REPO_ROOT / args[0]).resolve() == RL_YAML.resolve()
    load_config(RL_YAML, args[1:])


# ---- the proof: GRPO raises the exam reward of a partly trained model ---------------------------

N_RECORDS = 8


@pytest.fixture(scope="module")
def exam_records(sample_records):
    return sample_records[:N_RECORDS]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model_dir, exam_records):
    """A short, only partly converged LoRA SFT of the tiny model on the RL questions."""
    import torch

    from medtune.config import load_config
    from medtune.io import write_jsonl
    from medtune.train import sft

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("rl")
    train = root / "train.jsonl"
    write_jsonl(train, [r.to_dict() for r in exam_records])
    cfg = load_config(CONFIG_DIR / "quickstart.yaml", [
        f"model.name_or_path={tiny_model_dir}", f"data.train={train}", f"train.output_dir={root / 'sft'}",
        "train.max_steps=30", "train.report_to=", "train.logging_steps=10", "data.max_length=64",
    ])
    return sft.run(cfg), train, root


def sampled_exam_reward(model, tokenizer, records, seed: int = 1234, samples: int = 16, max_new: int = 16) -> float:
    """Mean exam reward of ``samples`` seeded temperature-1 completions per question."""
    import torch

    outputs, options, answers = [], [], []
    torch.manual_seed(seed)
    for rec in records:
        enc = tokenizer([QA.render_prompt(rec)], return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new, num_return_sequences=samples,
                                 pad_token_id=tokenizer.pad_token_id)
        outputs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        options += [rec.options] * samples
        answers += [rec.answer] * samples
    rewards = exam_reward(outputs, options, answers, QA, format_bonus=0.1)
    return sum(rewards) / len(rewards)


def rl_config(sft_dir: Path, train: Path, out: Path, *extra: str):
    from medtune.config import load_config

    return load_config(RL_YAML, [
        f"model.name_or_path={sft_dir}", f"data.train={train}", f"train.output_dir={out}",
        "train.report_to=", *extra,
    ])


def load_rl_policy(sft_dir: Path, rl_dir: Path):
    """The SFT model (adapter merged, as the RL run started from it) + the RL adapter."""
    from peft import PeftModel

    from medtune.models import load_for_inference

    model, tokenizer = load_for_inference(str(sft_dir))
    return PeftModel.from_pretrained(model, str(rl_dir / "adapter")).eval(), tokenizer


@pytest.mark.slow
def test_grpo_raises_the_exam_reward(sft_run, exam_records, capsys):
    from medtune.models import load_for_inference
    from medtune.train import rl

    sft_dir, train, root = sft_run
    model, tokenizer = load_for_inference(str(sft_dir))
    before = sampled_exam_reward(model, tokenizer, exam_records)

    rl_dir = rl.run(rl_config(sft_dir, train, root / "grpo", "train.max_steps=30"))
    policy, tokenizer = load_rl_policy(sft_dir, rl_dir)
    after = sampled_exam_reward(policy, tokenizer, exam_records)
    with capsys.disabled():
        print(f"\nexam reward of sampled completions: before GRPO {before:.3f}, after {after:.3f}")
    assert after > before

    # The run directory contract, and TRL's per-step reward in metrics.jsonl.
    for name in ("config.yaml", "template.yaml", "env.json", "data_summary.json", "train_results.json",
                 "adapter/adapter_config.json", "adapter/tokenizer_config.json"):
        assert (rl_dir / name).exists(), name
    assert get_template(str(rl_dir / "template.yaml")) == QA
    logged = [json.loads(line) for line in (rl_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum("reward" in row for row in logged) == 30
    results = json.loads((rl_dir / "train_results.json").read_text())
    assert results["global_step"] == 30 and results["reward_logged_steps"] == 30
    assert results["mean_reward_first_quarter"] is not None and results["mean_reward_last_quarter"] is not None


@pytest.mark.slow
def test_rloo_smoke(sft_run):
    from medtune.train import rl

    sft_dir, train, root = sft_run
    rl_dir = rl.run(rl_config(sft_dir, train, root / "rloo", "rl.algorithm=rloo", "train.max_steps=2",
                              "rl.num_generations=2", "train.batch_size=2"))
    results = json.loads((rl_dir / "train_results.json").read_text())
    assert results["algorithm"] == "rloo" and results["global_step"] == 2
    assert (rl_dir / "adapter" / "adapter_config.json").exists()
    assert any("reward" in json.loads(line) for line in (rl_dir / "metrics.jsonl").read_text().splitlines())


def test_grpo_on_conversations_uses_reference_overlap(tmp_path, tiny_model_dir):
    """Q/A data with reward exam: prompts + a reference column, ROUGE-L reward; one step runs."""
    from medtune.train import rl

    data = Path(str(resources.files("medtune") / "examples" / "medicalgpt" / "grpo_sample.jsonl"))
    cfg = rl_config(Path(tiny_model_dir), data, tmp_path / "conv", "train.max_steps=1", "data.max_samples=2",
                    "train.batch_size=2", "rl.num_generations=2", "rl.max_completion_length=8")
    rl_dir = rl.run(cfg)
    summary = json.loads((rl_dir / "data_summary.json").read_text())
    assert summary["kind"] == "conversation" and summary["prompts"] == 2
    assert any("rewards/reference_overlap/mean" in json.loads(line)
               for line in (rl_dir / "metrics.jsonl").read_text().splitlines())


# ---- reward model: scores the token ids it was trained on -------------------------------------------

# Prompt + reply pairs whose boundary characters merge in the tiny model's BPE (发 + 热 → 发热, ...),
# checked in the test rather than assumed.
MERGING_PAIRS = [
    {"prompt": "患者发", "chosen": "热三天", "rejected": "冷"},
    {"prompt": "咳", "chosen": "嗽怎么办", "rejected": "多喝水"},
    {"prompt": "最可能的诊", "chosen": "断是感冒", "rejected": "不知道"},
]


@pytest.mark.slow
def test_model_reward_scores_the_ids_the_reward_model_was_trained_on(tmp_path, tiny_model_dir, tiny_tokenizer,
                                                                     monkeypatch):
    """Where BPE merges across the prompt/reply boundary, RL feeds the RM exactly its training ids."""
    import torch
    from transformers import TrainerCallback

    from medtune.config import load_config
    from medtune.data.conversations import conversation_prompt
    from medtune.train import common, rewards, rm

    merged = [p for p in MERGING_PAIRS
              if tiny_tokenizer(p["prompt"] + p["chosen"])["input_ids"]
              != tiny_tokenizer(p["prompt"])["input_ids"] + tiny_tokenizer(p["chosen"], add_special_tokens=False)[
                  "input_ids"]]
    assert merged, "no pair merges across the boundary: the test would prove nothing"

    # 1. a reward model trained by stage rm, recording the batch its trainer builds from the pairs
    trained: dict = {}

    class RecordBatch(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):  # noqa: D102
            dataset = train_dataloader.dataset
            trained["batch"] = train_dataloader.collate_fn([dataset[i] for i in range(len(dataset))])

    standard = common.standard_callbacks
    monkeypatch.setattr(common, "standard_callbacks", lambda *a, **k: [*standard(*a, **k), RecordBatch()])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in MERGING_PAIRS), encoding="utf-8")
    rm_dir = rm.run(load_config(CONFIG_DIR / "rm_lora_tiny.yaml", [
        f"model.name_or_path={tiny_model_dir}", f"data.train={pairs}", f"train.output_dir={tmp_path / 'rm'}",
        "data.max_samples=null", "data.val_fraction=0", "train.max_steps=1", "train.report_to=",
    ]))
    batch, n = trained["batch"], len(MERGING_PAIRS)
    training_ids = [batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist() for i in range(n)]  # chosen

    # 2. the RL reward function on the same texts, recording what reaches the reward model
    fed: list[list[int]] = []
    loaded: dict = {}
    load = rewards.load_reward_model

    def spy(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        loaded["hook"] = model.register_forward_pre_hook(lambda module, a, kw: fed.extend(
            ids[mask.bool()].tolist() for ids, mask in zip(kw["input_ids"], kw["attention_mask"], strict=True)),
            with_kwargs=True)
        loaded["model"] = model
        return model, tokenizer

    monkeypatch.setattr(rewards, "load_reward_model", spy)
    reward_fn = rewards.make_model_reward_fn(rm_dir, batch_size=2)
    # the prompt as the RL stage renders it for a conversation (plain format, as the rm run)
    prompts = [conversation_prompt([{"role": "user", "content": p["prompt"]}], "plain", tiny_tokenizer)[0]
               for p in MERGING_PAIRS]
    got = reward_fn(prompts=prompts, completions=[p["chosen"] for p in MERGING_PAIRS],
                    completion_ids=[[0]] * n, trainer_state=None, log_extra=None, log_metric=None)

    assert fed == training_ids
    for pair in merged:  # ... which the one-string tokenisation would not have given
        i = MERGING_PAIRS.index(pair)
        assert tiny_tokenizer(prompts[i] + pair["chosen"], add_special_tokens=False)["input_ids"] != fed[i]
    # 3. and the reward is the reward model's own score of those ids, one sequence at a time
    loaded["hook"].remove()
    with torch.no_grad():
        direct = [loaded["model"](input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in training_ids]
    assert got == pytest.approx(direct, abs=1e-5)

    # 4. and GRPO trains with it (the rm run's conversation format is the RL run's)
    from medtune.train import rl

    convs = tmp_path / "prompts.jsonl"
    convs.write_text("".join(json.dumps({"id": str(i), "messages": [{"role": "user", "content": p["prompt"]}]},
                                        ensure_ascii=False) + "\n" for i, p in enumerate(MERGING_PAIRS)),
                     encoding="utf-8")
    rl_dir = rl.run(rl_config(Path(tiny_model_dir), convs, tmp_path / "grpo", "rl.reward=model",
                              f"rl.reward_model={rm_dir}", "train.max_steps=1", "train.batch_size=2",
                              "rl.num_generations=2", "rl.max_completion_length=4"))
    assert json.loads((rl_dir / "data_summary.json").read_text())["prompts"] == n
    assert any("rewards/reward_model/mean" in json.loads(line)
               for line in (rl_dir / "metrics.jsonl").read_text().splitlines())


def test_rl_prompts_render_through_the_runs_own_conversation_template(tmp_path, tiny_tokenizer):
    import yaml

    from medtune.config import load_config
    from medtune.train.rl import build_prompt_rows

    data = tmp_path / "conv.jsonl"
    data.write_text(json.dumps({"id": "c1", "messages": [{"role": "user", "content": "发热三天"},
                                                         {"role": "assistant", "content": "多饮水"}]},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    own = tmp_path / "mine.yaml"  # a template file of the user's own, not a shipped name
    own.write_text(yaml.safe_dump({"kind": "conversation", "name": "mine", "version": 1,
                                   "user_format": "【问】{user}\n【答】"}, allow_unicode=True), encoding="utf-8")
    cfg = load_config("src/medtune/configs/rl_grpo_exam_tiny.yaml",
                      [f"data.train={data}", f"data.conversation_format={own}", "model.name_or_path=x"])
    built = build_prompt_rows(cfg, tiny_tokenizer)
    assert [r["prompt"] for r in built.rows] == ["【问】发热三天\n【答】"]
    assert built.template.name == "mine"


# ---- reward model: remote code only when the RL config allows it --------------------------------------


def _rm_run_needing_remote_code(path: Path) -> Path:
    """A finished-looking rm run directory whose config.yaml says model.trust_remote_code: true."""
    import yaml

    (path / "adapter").mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({
        "stage": "rm", "model": {"name_or_path": "org/custom-code-model", "trust_remote_code": True},
        "data": {"conversation_format": "plain"}}), encoding="utf-8")
    return path


def test_reward_model_needing_remote_code_is_refused_unless_the_rl_config_allows_it(tmp_path, monkeypatch):
    """load_reward_model once never passed trust_remote_code: a custom-code reward model could not load."""
    from medtune import models
    from medtune.config import ConfigError
    from medtune.train import rewards

    run = _rm_run_needing_remote_code(tmp_path / "rm")
    seen: dict = {}

    def fake_load(name_or_path, **kwargs):
        seen.update(kwargs, name_or_path=name_or_path)
        raise RuntimeError("stop: loading is not under test")

    monkeypatch.setattr(models, "load_for_training", fake_load)
    # the rm run's own config.yaml does not turn remote code on: refused before anything is read
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(run))} was trained with model.trust_remote_code=true: loading it runs "
                                          r"Python code from org/custom-code-model; set model.trust_remote_code=true "
                                          r"in this RL config"):
        rewards.load_reward_model(run)
    assert not seen
    # the RL config allows it: passed through to the load
    with pytest.raises(RuntimeError, match="stop"):
        rewards.make_model_reward_fn(run, trust_remote_code=True)
    assert seen["trust_remote_code"] is True and seen["name_or_path"] == "org/custom-code-model"


def test_rl_train_refuses_a_remote_code_reward_model_in_one_line(tmp_path, tiny_model_dir, records_file, capsys):
    from medtune.cli import main

    run = _rm_run_needing_remote_code(tmp_path / "rm")
    out = tmp_path / "rl"
    rc = main(["train", str(RL_YAML), f"model.name_or_path={tiny_model_dir}", f"data.train={records_file(4)}",
               f"train.output_dir={out}", "train.report_to=", "rl.reward=model", f"rl.reward_model={run}"])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert err.strip().splitlines()[-1] == (
        f"medtune train: error: rl.reward_model: {run} was trained with model.trust_remote_code=true: loading it "
        "runs Python code from org/custom-code-model; set model.trust_remote_code=true in this RL config if you "
        "trust that code")
