"""Answer accuracy on the validation questions at every evaluation of an SFT run on exam data.

The validation loss says how likely the reference text is; what an exam run is for is the answer
the model picks. ``AnswerAccuracyCallback`` scores the validation questions each time the Trainer
evaluates and puts ``eval_accuracy`` into the same log entry as ``eval_loss``, so it lands in
``metrics.jsonl``, TensorBoard and the trainer state beside it, and can be the
``train.metric_for_best_model`` that ``load_best_model_at_end`` and early stopping use.

Two ways to read the model's answer (``train.eval_accuracy``):

- ``loglik``: the candidate answer letters (letter sets for multi-answer questions) scored as
  continuations of the prompt and the template's answer cue; the most likely one is the answer
  (``medtune.evaluation.loglik``, what ``medtune evaluate --mode loglik`` reports as ``accuracy``).
  One forward pass per single-answer question: cheap.
- ``generate``: greedy generation of ``train.eval_max_new_tokens`` tokens, read by the robust
  reader ``medtune.evaluation.extract.read_answer`` with the template's markers (what
  ``medtune predict`` + ``medtune evaluate`` report). Slower, and closer to how the model is used.

A question is correct when the letters read equal the gold letters exactly. In a multi-process
run every process scores all questions itself (greedy decoding and the forward passes are
deterministic, so all processes log, and choose the best checkpoint by, the same value).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import TrainerCallback

from medtune.records import ExamRecord
from medtune.templates import ExamTemplate

log = logging.getLogger(__name__)

MODES = ("loglik", "generate")
#: The key the accuracy is logged under (the Trainer's evaluation prefix is ``eval``).
METRIC = "eval_accuracy"


class AnswerAccuracyCallback(TrainerCallback):
    """Add ``eval_accuracy`` (validation answer accuracy) to each evaluation's logged metrics.

    It works in ``on_log``: the Trainer logs an evaluation's metrics (``eval_loss``, ...) through
    ``on_log`` before ``on_evaluate`` and before it compares checkpoints, and passes the same dict
    that it then returns as the evaluation's result. Adding the accuracy there puts it in the log
    line, the other callbacks' view (this one must come before them), and the best-checkpoint
    choice. ``on_evaluate`` fills it in again, should a transformers version pass a copy.

    Args:
        records: The validation questions (with gold answers).
        template: The exam template the run trains with.
        tokenizer: The run's tokenizer.
        mode: ``"loglik"`` or ``"generate"`` (see the module docstring).
        batch_size: Questions per forward pass or generation batch.
        max_new_tokens: ``generate``: tokens generated per question.
    """

    def __init__(self, records: list[ExamRecord], template: ExamTemplate, tokenizer: Any, mode: str,
                 batch_size: int = 8, max_new_tokens: int = 32):
        if mode not in MODES:
            raise ValueError(f"train.eval_accuracy: expected one of {list(MODES)}, got {mode!r}")
        if not records:
            raise ValueError("train.eval_accuracy: there are no validation questions to score")
        self.records = records
        self.template = template
        self.tokenizer = tokenizer
        self.mode = mode
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self._last: tuple[int, float] | None = None  # (global step, accuracy) of the latest evaluation
        if mode == "loglik":
            from medtune.evaluation.loglik import build_requests

            # The prompts do not change during training: tokenise them once.
            self._requests, self._candidates = build_requests(records, template, tokenizer, "letters")
        else:
            self._prompts = [template.render_prompt(r, tokenizer) for r in records]

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, model: Any = None,
               **kwargs: Any) -> None:
        """Score the validation questions when ``logs`` are an evaluation's metrics."""
        if not logs or "eval_loss" not in logs or METRIC in logs or model is None:
            return
        accuracy = self.score(model)
        logs[METRIC] = accuracy
        # The Trainer appended a copy of these logs to its history just before this call.
        if state.log_history and state.log_history[-1].get("eval_loss") == logs["eval_loss"]:
            state.log_history[-1][METRIC] = accuracy
        self._last = (state.global_step, accuracy)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kwargs: Any) -> None:
        """Make sure the evaluation's returned metrics carry the accuracy (best checkpoint, early stop)."""
        if metrics is not None and "eval_loss" in metrics and METRIC not in metrics and self._last:
            step, accuracy = self._last
            if step == state.global_step:
                metrics[METRIC] = accuracy

    def score(self, model: Any) -> float:
        """Accuracy of ``model`` on the validation questions, in [0, 1].

        The model is put in eval mode (no dropout) for the scoring and back in the mode it was in.
        """
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                letters = self._loglik_letters(model) if self.mode == "loglik" else self._generated_letters(model)
        finally:
            model.train(was_training)
        correct = sum(got == rec.answer for got, rec in zip(letters, self.records, strict=True))
        return correct / len(self.records)

    def _loglik_letters(self, model: Any) -> list[str]:
        from medtune.evaluation.loglik import pick
        from medtune.inference.hf import continuation_logprobs

        scores = continuation_logprobs(model, self._requests, self.tokenizer.pad_token_id, batch_size=self.batch_size)
        return [p["parsed"] for p in pick(self.records, self._candidates, scores, "letters")]

    def _generated_letters(self, model: Any) -> list[str]:
        from medtune.evaluation.extract import read_answer
        from medtune.inference.base import GenerationParams
        from medtune.inference.hf import HFBackend
        from medtune.inference.virtual_tokens import use_virtual_token_generation

        # prefix/prompt tuning: peft's own generate would ignore the trained virtual tokens
        backend = HFBackend(use_virtual_token_generation(model), self.tokenizer)
        params = GenerationParams(max_new_tokens=self.max_new_tokens)  # greedy
        outputs: list[str] = []
        for start in range(0, len(self._prompts), self.batch_size):
            outputs += backend.generate(self._prompts[start : start + self.batch_size], params,
                                        add_special_tokens=not self.template.chat)
        t = self.template
        return [read_answer(out, rec.options, t.answer_marker, t.explanation_marker).letters
                for out, rec in zip(outputs, self.records, strict=True)]
