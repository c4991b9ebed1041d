"""Log-likelihood scoring on a model whose logits are set by hand."""

from __future__ import annotations

import math

import pytest
import torch

from medtune.evaluation.loglik import answer_cue, build_requests, candidates, pick
from medtune.inference.hf import continuation_logprobs
from medtune.records import ExamRecord
from medtune.templates import get_template


class TableModel(torch.nn.Module):
    """Next-token logits depend only on the current token: logits[t] = table[input_ids[t]]."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return type("Out", (), {"logits": self.table[input_ids]})()


def _table():
    t = torch.zeros(5, 5)
    t[1, 2] = math.log(3)  # after token 1: p(2) = 3/7, every other token 1/7
    t[2, 4] = math.log(4)  # after token 2: p(4) = 4/8, every other token 1/8
    return t


def test_single_token_continuations_read_off_one_position():
    model = TableModel(_table())
    scores = continuation_logprobs(model, [([0, 1], [[2], [3]]), ([1], [[2]])], pad_id=0)
    assert scores[0] == pytest.approx([math.log(3 / 7), math.log(1 / 7)])
    assert scores[1] == pytest.approx([math.log(3 / 7)])  # shorter context, right-padded in the batch


def test_multi_token_continuation_sums_its_tokens():
    model = TableModel(_table())
    (scores,) = continuation_logprobs(model, [([0, 1], [[2, 4], [3]])], pad_id=0)
    # [2, 4]: p(2 | 1) · p(4 | 2) = 3/7 · 1/2 = 3/14;  [3]: p(3 | 1) = 1/7
    assert scores == pytest.approx([math.log(3 / 14), math.log(1 / 7)])


def test_batching_does_not_change_scores():
    model = TableModel(_table())
    reqs = [([0, 1], [[2, 4], [3]]), ([3, 3, 3, 1], [[2], [4]]), ([2], [[4, 1], [0]])]
    together = continuation_logprobs(model, reqs, pad_id=0, batch_size=8)
    alone = [continuation_logprobs(model, [r], pad_id=0, batch_size=1)[0] for r in reqs]
    for got, want in zip(together, alone, strict=True):
        assert got == pytest.approx(want)


REC = ExamRecord("q1", "问题", {"A": "甲", "B": "乙", "C": "丙", "D": "丁", "E": "戊"}, "B")
MULTI = ExamRecord("q2", "问题", {"A": "甲", "B": "乙", "C": "丙", "D": "丁"}, "AC")


def test_candidates_and_cues():
    assert candidates(REC) == ["A", "B", "C", "D", "E"]
    multi = candidates(MULTI)
    assert len(multi) == 11 and multi[:3] == ["AB", "AC", "AD"] and multi[-1] == "ABCD"  # C(4,2)+C(4,3)+1
    assert answer_cue(get_template("qa")) == ""
    assert answer_cue(get_template("analysis_first")) == "正确选项："
    assert answer_cue(get_template("cmexam_paper")) == "答案: "


def test_requests_share_the_cue_in_the_context(tiny_tokenizer):
    tpl = get_template("analysis_first")
    (req,), (cands,) = build_requests([REC], tpl, tiny_tokenizer)
    ctx, conts = req
    prompt = tiny_tokenizer(tpl.render_prompt(REC), add_special_tokens=True)["input_ids"]
    cue = tiny_tokenizer("正确选项：", add_special_tokens=False)["input_ids"]
    assert ctx == prompt + cue
    assert conts == [tiny_tokenizer(c, add_special_tokens=False)["input_ids"] for c in cands]
    assert all(len(c) == 1 for c in conts)  # letters are single tokens: one forward pass per question


def test_pick_raw_and_length_normalised():
    rec = ExamRecord("q", "问题", {"A": "甲", "B": "乙乙乙乙"}, "B")
    (p,) = pick([rec], [["A", "B"]], [[-2.0, -3.0]], choices="text")
    assert p["parsed"] == "A"  # -2 > -3
    assert p["parsed_norm"] == "B"  # -2/1 < -3/4
    assert p["option_scores_norm"] == {"A": -2.0, "B": -0.75}


def test_evaluate_loglik_with_the_fake_backend(tmp_path, tiny_tokenizer):
    """The scoring path is backend-agnostic: the fake backend's scores decide the picks."""
    import json

    from medtune.evaluation.evaluate import evaluate_loglik
    from medtune.inference.base import FakeBackend

    rec = ExamRecord("q1", "问题", {"A": "甲", "B": "乙"}, "A").validate()
    res = evaluate_loglik([rec], FakeBackend(), tiny_tokenizer, get_template("qa"), tmp_path)
    # fake score = -len - 0.1·sum(ids): the letter with the smaller token id wins
    ids = {c: tiny_tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in "AB"}
    expected = min(ids, key=ids.get)
    row = json.loads((tmp_path / "scored.jsonl").read_text())
    assert row["parsed"] == expected and res["accuracy"] == (100.0 if expected == "A" else 0.0)
    assert row["option_scores"] == pytest.approx({c: -1 - 0.1 * i for c, i in ids.items()})


# ---- acc_norm divides the sum over the whole option text ------------------------------------------


class VocabTokenizer:
    """Greedy longest-match tokenizer over a small vocabulary; other characters are one token each.

    It concatenates like BPE (the tokens' texts spell the input), which is what lets a test decide
    by hand which tokens lie in the cue and which straddle the cue and the option.
    """

    def __init__(self, vocab: dict[str, int]):
        self.vocab = vocab
        self.longest = max(len(piece) for piece in vocab)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        """``{"input_ids": [...]}`` like a Hugging Face tokenizer (there are no special tokens)."""
        ids, i = [], 0
        while i < len(text):
            for size in range(min(self.longest, len(text) - i), 0, -1):
                piece = text[i : i + size]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    i += size
                    break
            else:
                ids.append(1000 + ord(text[i]))  # out-of-vocabulary character: its own token
                i += 1
        return {"input_ids": ids}


class TokenTableBackend:
    """``loglikelihood`` with a fixed log-probability per token, whatever the context."""

    def __init__(self, logprob: dict[int, float]):
        self.logprob = logprob

    def loglikelihood(
        self, requests: list[tuple[list[int], list[list[int]]]], batch_size: int = 16
    ) -> list[list[float]]:
        """Each continuation's summed table entries (``batch_size`` is ignored)."""
        return [[sum(self.logprob[t] for t in cont) for cont in conts] for _, conts in requests]


def test_acc_norm_is_not_a_partial_sum_when_options_share_a_leading_token(tmp_path):
    """Issue: ``--choices text`` acc_norm divided the option's length into a sum missing its shared tokens."""
    import json

    from medtune.evaluation.evaluate import evaluate_loglik

    tok = VocabTokenizer({"急性": 1, "胃炎": 2, "肠梗阻": 3})
    rec = ExamRecord("q1", "问题", {"A": "急性胃炎", "B": "急性肠梗阻"}, "B").validate()
    tpl = get_template("qa")  # empty cue: the context is the prompt alone
    (req,), _ = build_requests([rec], tpl, tok, choices="text")
    assert req == (tok(tpl.render_prompt(rec))["input_ids"], [[1, 2], [1, 3]])  # 急性 stays in both

    backend = TokenTableBackend({1: -4.0, 2: -1.0, 3: -2.0})
    res = evaluate_loglik([rec], backend, tok, tpl, tmp_path, choices="text")
    row = json.loads((tmp_path / "scored.jsonl").read_text())
    # sums: A = -4 - 1 = -5 (4 characters), B = -4 - 2 = -6 (5 characters)
    assert row["option_scores"] == {"A": -5.0, "B": -6.0}
    assert row["option_scores_norm"] == {"A": -1.25, "B": -1.2}
    assert row["parsed"] == "A" and row["parsed_norm"] == "B"
    assert res["accuracy"] == 0.0 and res["acc_norm"] == 100.0
    # The old code moved 急性 into the context and divided what was left: A -1/4, B -2/5. The raw
    # argmax is the same (急性 adds -4 to both), the normalised one is not.
    old_norm = {"A": -1.0 / 4, "B": -2.0 / 5}
    assert max(old_norm, key=old_norm.get) == "A" != row["parsed_norm"]


def test_acc_norm_straddling_cue_token_counts_with_the_option():
    """A token merging the cue's end with the option is scored; the context stops before it."""
    # cmexam_paper's cue is "答案: "; " 甲" and " A"/" B" merge the cue's space with what follows.
    tok = VocabTokenizer({"答案": 1, ":": 2, " ": 3, " 甲": 4, "乙": 5, " A": 6, " B": 7})
    tpl = get_template("cmexam_paper")
    rec = ExamRecord("q1", "问题", {"A": "甲", "B": "乙"}, "B")
    prompt = tok(tpl.render_prompt(rec))["input_ids"]

    (req,), _ = build_requests([rec], tpl, tok, choices="text")
    # "答案: 甲" -> 答案 : " 甲";  "答案: 乙" -> 答案 : " " 乙. The cue's space is a token of its
    # own for B only, so it stays out of the context: both continuations cover " " + the option.
    assert req == (prompt + [1, 2], [[4], [3, 5]])
    (p,) = pick([rec], [["A", "B"]], TokenTableBackend({4: -2.0, 3: -0.5, 5: -1.0}).loglikelihood([req]), "text")
    assert p["option_scores_norm"] == {"A": -2.0, "B": -1.5}  # each option is one character

    # letters: every letter merges with the space the same way, so each candidate is one token
    # (the one-forward-pass case) and the rest of the cue is context
    (req,), _ = build_requests([rec], tpl, tok, choices="letters")
    assert req == (prompt + [1, 2], [[6], [7]])


def test_acc_norm_refuses_an_empty_option_rather_than_scoring_it_zero():
    tok = VocabTokenizer({"甲": 1})
    rec = ExamRecord("q1", "问题", {"A": "甲", "B": ""}, "A")  # not validated: validate() refuses it too
    with pytest.raises(ValueError, match="q1.*'B'"):
        build_requests([rec], get_template("qa"), tok, choices="text")


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    """The tiny model on one CPU thread.

    A model this small gains nothing from more threads, and on a shared, busy machine several
    threads per forward pass made the hundreds of passes below 20x slower.
    """
    from medtune.models import load_causal_lm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_causal_lm(str(tiny_model_dir), dtype="float32", device="cpu").eval()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("template", ["qa", "analysis_first"])
def test_acc_norm_follows_its_definition_on_sample_options_sharing_leading_tokens(
    template, sample_records, tiny_model, tiny_tokenizer
):
    """Issue example: val_sample-00033 picked B by acc_norm where the definition picks C."""
    from medtune.evaluation.loglik import candidate_text

    tpl, tok = get_template(template), tiny_tokenizer
    cue = answer_cue(tpl)
    cue_ids = tok(cue, add_special_tokens=False)["input_ids"] if cue else []

    def option_ids(text: str) -> list[int]:
        """The option's own tokens, tokenised after the cue as the training target is."""
        ids = tok(cue + text, add_special_tokens=False)["input_ids"]
        assert ids[: len(cue_ids)] == cue_ids  # these cues never merge with an option here
        return ids[len(cue_ids) :]

    shared = [
        r for r in sample_records
        if len({tuple(option_ids(candidate_text(r, c, "text"))[:1]) for c in candidates(r, "text")}) == 1
    ]
    assert len(shared) >= 20  # 65 with the tiny tokenizer: the test is not vacuous

    # The definition, straight from the model: per-token log-probabilities of each option.
    token_lps: list[dict[str, list[float]]] = []
    with torch.no_grad():
        for rec in shared:
            context = tok(tpl.render_prompt(rec), add_special_tokens=True)["input_ids"] + cue_ids
            row = {}
            for c in candidates(rec, "text"):
                ids = option_ids(candidate_text(rec, c, "text"))
                logits = tiny_model(input_ids=torch.tensor([context + ids])).logits[0]
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                row[c] = [float(logprobs[len(context) - 1 + k, t]) for k, t in enumerate(ids)]
            token_lps.append(row)
    sums = [{c: sum(lps) for c, lps in row.items()} for row in token_lps]
    norms = [{c: s / len(candidate_text(rec, c, "text")) for c, s in row.items()}
             for rec, row in zip(shared, sums, strict=True)]

    requests, cand_lists = build_requests(shared, tpl, tok, choices="text")
    scores = continuation_logprobs(tiny_model, requests, tok.pad_token_id, batch_size=8)
    picks = pick(shared, cand_lists, scores, "text")
    for rec, p, want_sum, want_norm in zip(shared, picks, sums, norms, strict=True):
        assert p["option_scores_norm"] == pytest.approx(want_norm, abs=1e-4), rec.id
        assert p["parsed_norm"] == max(want_norm, key=want_norm.get), rec.id
        assert p["parsed"] == max(want_sum, key=want_sum.get), rec.id

    # What the old code computed: the leading tokens every option shares left out of the sum,
    # the whole option's length still the divisor. Its raw argmax agrees, its acc_norm does not.
    old_norm_picks, old_picks = [], []
    for rec, row in zip(shared, token_lps, strict=True):
        ids = [option_ids(candidate_text(rec, c, "text")) for c in row]
        n = min(len(i) for i in ids)
        lead = next((k for k in range(n) if len({i[k] for i in ids}) > 1), n)
        lead = min(lead, n - 1)  # the old code kept at least one token in every continuation
        partial = {c: sum(lps[lead:]) for c, lps in row.items()}
        old_picks.append(max(partial, key=partial.get))
        old_norm_picks.append(max(partial, key=lambda c: partial[c] / len(candidate_text(rec, c, "text"))))
    assert old_picks == [p["parsed"] for p in picks]
    changed = {rec.id for rec, old, p in zip(shared, old_norm_picks, picks, strict=True) if old != p["parsed_norm"]}
    assert len(changed) >= 3 and "val_sample-00033" in changed


class KeepingTableModel(TableModel):
    """TableModel with transformers' ``logits_to_keep``: logits only for the last k positions."""

    def __init__(self, table: torch.Tensor):
        super().__init__(table)
        self.kept: list[tuple[int, int]] = []  # (width, positions through the head) per forward

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0):
        logits = self.table[input_ids]
        self.kept.append((input_ids.shape[1], logits_to_keep or input_ids.shape[1]))
        return type("Out", (), {"logits": logits[:, -logits_to_keep:] if logits_to_keep else logits})()


def test_lm_head_runs_only_on_the_positions_read():
    """The LM head over every prompt position was most of loglik's work at a 150k vocabulary."""
    reqs = [([0, 1, 3, 3, 3, 1], [[2], [3]]), ([3, 3, 3, 3, 1], [[2], [4]]), ([0, 1, 2, 1], [[2, 4], [3]]),
            ([3, 1], [[2, 4], [0]])]
    keeping = KeepingTableModel(_table())
    got = continuation_logprobs(keeping, reqs, pad_id=0, batch_size=8)
    want = continuation_logprobs(TableModel(_table()), reqs, pad_id=0, batch_size=8)  # every position
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=1e-6)
    # single-token batch: contexts of 5 and 6 tokens read columns 4 and 5 → 2 of 6 columns;
    # multi-token batch: sequences up to 6 long, the earliest read column is 1 → 5 of 6
    assert keeping.kept == [(6, 2), (6, 5)]


@pytest.mark.parametrize("adapter", [None, "prompt", "prefix"])
def test_kept_logits_equal_full_logits_on_a_real_model(tiny_model_dir, tiny_tokenizer, monkeypatch, adapter):
    """Same scores with and without ``logits_to_keep``, also when virtual tokens come first (prompt tuning)."""
    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

    from medtune.inference import hf
    from medtune.models import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir), dtype="float32", device="cpu")
    if adapter:
        config = (PromptTuningConfig if adapter == "prompt" else PrefixTuningConfig)(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5)
        torch.manual_seed(0)
        model = get_peft_model(model, config)
    model.eval()
    encode = lambda text: tiny_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    reqs = [(encode("问题：胸痛沿肋间神经分布\n答案："), [encode("A"), encode("B")]),
            (encode("问题：发热三天，体温39.5度，最可能的诊断\n答案："), [encode("C"), encode("D")]),
            (encode("问题：不寐\n答案："), [encode("心脾两虚"), encode("肝火")])]
    assert hf._accepts_logits_to_keep(model)
    kept = continuation_logprobs(model, reqs, tiny_tokenizer.pad_token_id, batch_size=4)
    monkeypatch.setattr(hf, "_accepts_logits_to_keep", lambda m: False)
    full = continuation_logprobs(model, reqs, tiny_tokenizer.pad_token_id, batch_size=4)
    for k, f in zip(kept, full, strict=True):
        assert k == pytest.approx(f, abs=1e-4)


@pytest.mark.parametrize(("arch", "mode"), [("llama", "hidden"), ("glm4", "hidden"), ("phi", "hidden"),
                                            ("gemma3", "hidden"), ("qwen3_moe", "hidden"), ("deepseek_v3", "hidden"),
                                            ("gemma2", "span")])  # Gemma 2 soft-caps its logits after the head
def test_label_head_equals_full_logits_on_every_family(arch_model_dir, monkeypatch, arch, mode):
    from medtune.inference import hf
    from medtune.models import load_causal_lm, load_tokenizer

    path = arch_model_dir(arch)
    model, tok = load_causal_lm(str(path), dtype="float32", device="cpu").eval(), load_tokenizer(str(path))
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    reqs = [(encode("问题：胸痛沿肋间神经分布\n答案："), [encode("A"), encode("B"), encode("C")]),
            (encode("问题：发热三天，体温39.5度，HBsAg阳性，最可能的诊断\n答案："), [encode("D"), encode("E")]),
            (encode("问题：不寐\n答案："), [encode("心脾两虚"), encode("肝火扰心")])]
    head = hf._LabelHead(model)
    assert head.mode == mode
    kept = continuation_logprobs(model, reqs, tok.pad_token_id, batch_size=4)
    monkeypatch.setattr(hf, "_accepts_logits_to_keep", lambda m: False)
    full = continuation_logprobs(model, reqs, tok.pad_token_id, batch_size=4)
    for k, f in zip(kept, full, strict=True):
        assert k == pytest.approx(f, abs=1e-4)


def test_label_head_falls_back_when_the_check_fails(tiny_model_dir, tiny_tokenizer):
    """A model whose logits are not its output embedding of the last hidden state is caught on the first batch."""
    from medtune.inference import hf
    from medtune.models import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir), dtype="float32", device="cpu").eval()
    original = model.forward

    def scaled(input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):  # logits × 2 after the head,
        out = original(input_ids=input_ids, attention_mask=attention_mask,  # no config attribute saying so
                       logits_to_keep=logits_to_keep, **kwargs)
        out.logits = out.logits * 2
        return out

    model.forward = scaled
    head = hf._LabelHead(model)
    assert head.mode == "hidden"
    reqs = [([5, 6, 7, 8], [[9], [10]]), ([5, 6], [[9], [11]])]
    got = head.log_probs([r[0] for r in reqs], [[3], [1]], tiny_tokenizer.pad_token_id, "cpu")
    assert head.mode == "span"
    with torch.inference_mode():
        want = torch.log_softmax(scaled(input_ids=torch.tensor([[5, 6, 7, 8]])).logits[0, 3].float(), dim=-1)
    assert torch.allclose(got[0][0], want, atol=1e-5)
