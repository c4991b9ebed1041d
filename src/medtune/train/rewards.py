"""Reward functions for the online RL stage (GRPO / RLOO).

Which reward applies to which data (``rl.reward`` and the kind of ``data.train``):

============================  =====================  ==============================================
data                          ``rl.reward``          reward
============================  =====================  ==============================================
exam records / CMExam files   ``exam``               :func:`exam_reward` (via :func:`make_exam_reward_fn`)
conversations (Q/A, alpaca…)  ``exam``               :func:`reference_overlap_reward` — no options, so
                                                     no letters to check; ROUGE-L against the reply
either                        ``model``              :func:`make_model_reward_fn` (a stage-rm run)
============================  =====================  ==============================================

The exam reward reads answers with :func:`medtune.inference.chat.read_exam_answer`, i.e.
:func:`medtune.evaluation.extract.read_answer`, the same reader evaluation uses, so what RL
rewards is exactly what the exam score counts. Hedges (every option, ``A或B``) and conflicting
answers read as no answer, so listing options earns nothing.

TRL 1.16 calls a Python reward function as ``f(prompts=..., completions=..., completion_ids=...,
**columns)`` where every extra dataset column arrives as a list aligned with ``completions``
(plus ``trainer_state``, ``log_extra`` and ``log_metric``), and expects one float per completion.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medtune.templates import ExamTemplate

if TYPE_CHECKING:
    from medtune.evaluation.extract import AnswerReading

log = logging.getLogger(__name__)

RewardFn = Callable[..., list[float]]


def has_answer_format(output: str, options: dict[str, str], template: ExamTemplate) -> bool:
    """Whether ``output`` is laid out the way ``template`` asks for.

    Precisely, all of:

    * when the template has an ``answer_marker``, it occurs in the output (a ``None`` marker
      means the prompt ends with the answer cue, so the output itself starts with the answer);
    * the answer is read from the answer region (:func:`medtune.evaluation.extract.split_output`)
      and is at least one option letter — letters only found by the whole-output fallback, a
      later self-correction outside the region, a hedge or a conflict don't count;
    * when the template has an ``explanation_marker``, it occurs in the output.

    Args:
        output: The generated completion.
        options: Option letter → option text of the question.
        template: The exam template the prompt was rendered with.

    Returns:
        True when the output has the template's answer format.
    """
    from medtune.inference.chat import read_exam_answer

    return _well_formed(output, template, read_exam_answer(output, options, template))


def _well_formed(output: str, template: ExamTemplate, reading: AnswerReading) -> bool:
    from medtune.evaluation.extract import drop_reasoning

    output = drop_reasoning(output)  # markers inside a <think> block are not the answer's format
    if template.answer_marker and template.answer_marker not in output:
        return False
    if template.explanation_marker and template.explanation_marker not in output:
        return False
    return bool(reading.letters) and reading.in_region


def exam_reward(
    completions: Sequence[str],
    options: Sequence[dict[str, str]],
    answer: Sequence[str],
    template: ExamTemplate,
    format_bonus: float = 0.1,
) -> list[float]:
    """Exam reward per completion: correctness (0 or 1) plus a format bonus.

    ``1.0`` when the letters read from the output (:func:`read_exam_answer`, as evaluation reads
    them) equal the gold letters exactly — a multi-answer question needs every letter and no
    extra one — plus ``format_bonus`` when :func:`has_answer_format` holds. So: right and well
    formed → ``1 + bonus``; right but e.g. without the explanation marker → ``1``; wrong but well
    formed → ``bonus``; nothing parseable, a hedge or conflicting answers → ``0``.

    Args:
        completions: Generated outputs (text after the prompt).
        options: Per completion, the question's option letter → text.
        answer: Per completion, the gold letters (any order, e.g. ``"DA"``).
        template: The exam template the prompts were rendered with.
        format_bonus: Added for a well-formed output; 0 turns the bonus off.

    Returns:
        One float per completion.

    Raises:
        ValueError: When the three sequences differ in length.
    """
    from medtune.inference.chat import read_exam_answer
    from medtune.records import normalise_letters

    if not len(completions) == len(options) == len(answer):
        raise ValueError(f"{len(completions)} completions, {len(options)} options, {len(answer)} answers")
    rewards = []
    for output, opts, gold in zip(completions, options, answer, strict=True):
        reading = read_exam_answer(output, opts, template)  # read once for both parts
        # Gold letters are normalised to option order, the order the parser returns letters in.
        correct = bool(reading.letters) and reading.letters == normalise_letters(gold, opts)
        bonus = format_bonus if _well_formed(output, template, reading) else 0.0
        rewards.append((1.0 if correct else 0.0) + bonus)
    return rewards


def _as_options(value: Any) -> dict[str, str]:
    # The RL dataset stores options as a JSON string: an Arrow struct column would give every
    # row the union of all rows' letters (a 4-option question would gain "E": None).
    return json.loads(value) if isinstance(value, str) else dict(value)


def _as_text(completion: Any) -> str:
    # Conversational datasets give completions as message lists; plain ones give strings.
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def make_exam_reward_fn(template: ExamTemplate, format_bonus: float = 0.1) -> RewardFn:
    """A TRL reward function wrapping :func:`exam_reward`.

    The dataset must have ``options`` (JSON string or dict) and ``answer`` columns; TRL passes
    them as keyword lists aligned with ``completions``.

    Args:
        template: The exam template the prompts were rendered with.
        format_bonus: See :func:`exam_reward`.

    Returns:
        ``f(prompts, completions, **kwargs) -> list[float]``.
    """

    def exam(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        options = [_as_options(o) for o in kwargs["options"]]
        return exam_reward([_as_text(c) for c in completions], options, kwargs["answer"], template, format_bonus)

    exam.__name__ = "exam"  # TRL logs each reward function as rewards/<name>/mean
    return exam


def reference_overlap_reward(completions: Sequence[str], reference: Sequence[str]) -> list[float]:
    """Character ROUGE-L (CMExam's definition, in [0, 1]) of each completion against its reference.

    The reward for conversation data (question → reference answer, e.g. MedicalGPT's
    ``grpo_sample.jsonl``), where there are no options to check. An empty reference scores 0
    (nothing to match) rather than raising.

    Args:
        completions: Generated replies.
        reference: Reference replies, aligned with ``completions``.

    Returns:
        One float per completion, 0 (no overlap) to 1 (identical).

    Raises:
        ValueError: When the two sequences differ in length.
    """
    from medtune.evaluation.metrics import rouge_l

    if len(completions) != len(reference):
        raise ValueError(f"{len(completions)} completions but {len(reference)} references")
    return [
        rouge_l([str(c)], [str(r)]) / 100.0 if str(r).strip() else 0.0
        for c, r in zip(completions, reference, strict=True)
    ]


def make_reference_overlap_reward_fn() -> RewardFn:
    """A TRL reward function wrapping :func:`reference_overlap_reward` (dataset column ``reference``)."""

    def reference_overlap(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        return reference_overlap_reward([_as_text(c) for c in completions], kwargs["reference"])

    return reference_overlap


def reward_model_config(reward_run_dir: str | Path) -> dict[str, Any]:
    """The saved ``config.yaml`` of a finished stage-rm run directory (nothing is loaded).

    Raises:
        FileNotFoundError: When the directory is not a finished run (no config.yaml, or neither
            ``adapter/`` nor ``model/``).
    """
    import yaml

    run_dir = Path(reward_run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no config.yaml)")
    if not (run_dir / "model").is_dir() and not (run_dir / "adapter").is_dir():
        raise FileNotFoundError(f"{run_dir}: the run has not finished (no adapter/ or model/ folder)")
    with open(cfg_path, encoding="utf-8") as fh:
        saved = yaml.safe_load(fh) or {}
    if saved.get("stage") not in (None, "rm"):
        log.warning("%s is a stage-%s run, not a reward model (stage rm)", run_dir, saved.get("stage"))
    return saved


def check_reward_model_trust(reward_run_dir: str | Path, saved: dict[str, Any], trust_remote_code: bool) -> None:
    """Refuse a reward model that needs remote code the RL run's own config does not allow.

    The rule of :func:`medtune.inference.loading.resolve_source`: a run directory may come from
    someone else, so its ``config.yaml`` may say which model it is, never that Python code from
    that model's repository may run. Only the RL config, which the user wrote for this run, can
    allow that (``model.trust_remote_code: true``).

    Args:
        reward_run_dir: The rm run directory (named in the message).
        saved: Its ``config.yaml`` (:func:`reward_model_config`).
        trust_remote_code: The RL run config's ``model.trust_remote_code``.

    Raises:
        ConfigError: The rm run was trained with ``model.trust_remote_code: true`` and
            ``trust_remote_code`` is False.
    """
    from medtune.config import ConfigError

    model = saved.get("model") or {}
    if model.get("trust_remote_code") and not trust_remote_code:
        raise ConfigError(
            f"{reward_run_dir} was trained with model.trust_remote_code=true: loading it runs Python code from "
            f"{model.get('name_or_path')}; set model.trust_remote_code=true in this RL config if you trust that code")


def load_reward_model(reward_run_dir: str | Path, dtype: str = "auto",
                      trust_remote_code: bool = False) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a stage-rm run directory, in eval mode.

    A reward-model run directory holds ``config.yaml`` (whose ``model.name_or_path`` is the base
    model or a previous run) and either ``adapter/`` (a SEQ_CLS LoRA whose ``modules_to_save``
    include the score head) or ``model/`` (a full fine-tune).

    Args:
        reward_run_dir: The rm run directory.
        dtype: Model dtype name (see :func:`medtune.models.resolve_dtype`).
        trust_remote_code: The RL run config's ``model.trust_remote_code``, passed to every load
            (a reward model of a custom-code architecture needs it). The rm run's own
            ``config.yaml`` never turns it on: a run that needed it is refused without it
            (:func:`check_reward_model_trust`).

    Returns:
        The sequence-classification model (one logit per text) and its tokenizer.

    Raises:
        FileNotFoundError: When the directory is not a finished rm run.
        ConfigError: The rm run needs remote code and ``trust_remote_code`` is False.
    """
    from medtune.models import default_device, load_for_training, load_tokenizer

    run_dir = Path(reward_run_dir)
    saved = reward_model_config(run_dir)
    check_reward_model_trust(run_dir, saved, trust_remote_code)  # before any file of the model is read
    if (run_dir / "model").is_dir():  # full fine-tune: the folder is a complete seq-cls model
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(str(run_dir / "model"), num_labels=1,
                                                                   trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(str(run_dir / "model"), trust_remote_code=trust_remote_code)
        model.to(default_device())
    elif (run_dir / "adapter").is_dir():
        from peft import PeftModel

        # The rm's own starting point (base model, or an sft run whose adapter gets merged), loaded
        # with a score head; the rm adapter then supplies the LoRA weights and the trained head.
        model, tokenizer, _ = load_for_training(
            saved["model"]["name_or_path"], dtype=dtype, trust_remote_code=trust_remote_code,
            sequence_classification=True,
        )
        model = PeftModel.from_pretrained(model, str(run_dir / "adapter"))
        if (run_dir / "adapter" / "tokenizer_config.json").exists():
            tokenizer = load_tokenizer(str(run_dir / "adapter"), trust_remote_code=trust_remote_code)
    else:
        raise FileNotFoundError(f"{run_dir}: the run has not finished (no adapter/ or model/ folder)")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
    model.eval()
    return model, tokenizer


def reward_model_sequence(prompt: str, completion: str, tokenizer: Any, conversation_format: str) -> list[int]:
    """Token ids of ``prompt + completion`` exactly as stage rm trained the reward model on them.

    Stage rm tokenises the prompt on its own, as inference feeds it (``encode_conversation_prompt``:
    special tokens only for the ``plain`` format, chat templates carry their own), and the reply
    on its own, ending with EOS (``rm.scored_sequence``). Tokenising ``prompt + completion`` as
    one string instead lets BPE merge the prompt's last characters with the completion's first
    ones: a sequence the reward model never saw.

    Args:
        prompt: The rendered prompt text (as the policy was given it).
        completion: The generated reply text (without special tokens).
        tokenizer: The reward model's tokenizer.
        conversation_format: The rm run's ``data.conversation_format``.

    Returns:
        Prompt ids + completion ids + EOS.
    """
    from medtune.data.conversations import uses_special_tokens
    from medtune.data.sft import encode_target
    from medtune.train.rm import scored_sequence

    row = {"prompt_ids": tokenizer(prompt, add_special_tokens=uses_special_tokens(conversation_format))["input_ids"],
           "completion_ids": encode_target(tokenizer, completion)}
    return scored_sequence(row, "completion", tokenizer)


def make_model_reward_fn(reward_run_dir: str | Path, batch_size: int = 16, max_length: int = 1024,
                         trust_remote_code: bool = False) -> RewardFn:
    """A TRL reward function scoring ``prompt + completion`` with a stage-rm reward model.

    Each pair is scored on the token ids the reward model was trained on
    (:func:`reward_model_sequence`: the prompt and the completion tokenised apart, the
    completion ending with EOS), batched and read as in rm's own evaluation
    (``rm.reward_scores``). A completion cut at ``rl.max_completion_length`` gets the EOS too,
    so it is scored as a finished reply, the only kind the reward model saw.

    Args:
        reward_run_dir: The rm run directory (see :func:`load_reward_model`).
        batch_size: Sequences scored per forward pass.
        max_length: Longer sequences lose tokens from the left, keeping the completion.
        trust_remote_code: The RL run config's ``model.trust_remote_code`` (see
            :func:`load_reward_model`).

    Returns:
        ``f(prompts, completions, **kwargs) -> list[float]`` (the raw reward-model logit).

    Raises:
        ConfigError: The rm run needs remote code and ``trust_remote_code`` is False.
    """
    from medtune.train.rm import reward_scores

    fmt = (reward_model_config(reward_run_dir).get("data") or {}).get("conversation_format", "plain")
    model, tokenizer = load_reward_model(reward_run_dir, trust_remote_code=trust_remote_code)

    def reward_model(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        sequences = [reward_model_sequence(_as_text(p), _as_text(c), tokenizer, fmt)[-max_length:]
                     for p, c in zip(prompts, completions, strict=True)]
        return reward_scores(model, tokenizer, sequences, batch_size)

    return reward_model
