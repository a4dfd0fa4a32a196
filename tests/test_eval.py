"""`griffin eval`: lm-eval modes against hand-computed references, on tiny local tasks.

Offline only: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE and a temporary HF_HOME.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from griffin_cli.main import app
from griffin_export import export, keep_count
from griffin_export.errors import UsageError
from griffin_export.evaluation.taskeval import evaluate_tasks

from tiny import char_tokenizer, tiny_model

pytest.importorskip("lm_eval")

K_HALF = 18  # round(0.5 * 37): the neurons kept per layer of the tiny model at ratio 0.5

MC_DOCS = [
    {"context": "The cat sat on the", "choices": [" mat.", " moon!", " dog ran", " 7"], "label": 0},
    {"context": "One, two, three,", "choices": [" four", " pie", " zebra", " x"], "label": 0},
    {"context": "Hello there, my", "choices": [" friend", " 42", " sky is", " no"], "label": 0},
]
GEN_DOCS = [
    {"context": "Say it: abc abc a", "answer": "bc"},
    {"context": "Count: 1 2 3 4", "answer": " 5"},
]


def _task(folder: Path, name: str, docs: list[dict[str, Any]], body: str) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str(data))}\ntest_split: test\n{body}"
    )


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    _task(
        folder,
        "tiny_mc",
        MC_DOCS,
        "output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n",
    )
    _task(
        folder,
        "tiny_gen",
        GEN_DOCS,
        "output_type: generate_until\ndoc_to_text: context\ndoc_to_target: answer\n"
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n",
    )
    _task(
        folder,
        "tiny_rolling",
        MC_DOCS,
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: context\n'
        "metric_list:\n  - metric: word_perplexity\n",
    )
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama whose FF outputs are scaled up 30x, so that pruning them changes
    greedy tokens (with the default init the residual stream drowns them)."""
    directory = tmp_path_factory.mktemp("tiny") / "model"
    model = tiny_model("llama", seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(30)
    model.save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead on a shared CPU
    yield
    torch.set_num_threads(threads)


def _run(model: Any, tasks_dir: Path, **kwargs: Any) -> Any:
    kwargs.setdefault("tasks", ["tiny_mc"])
    return evaluate_tasks(model, include_path=[tasks_dir], **kwargs)


def _responses(report: Any, name: str) -> list[Any]:
    return [row["responses"][name] for row in report.sample_rows()]


def _load(directory: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory).eval()


def _forward_with_down_hook(model: Any, ids: torch.Tensor, hook: Any) -> torch.Tensor:
    """Logits ``[L, V]`` of one forward with ``hook`` as every down projection's pre-hook."""
    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook) for layer in model.model.layers]
    try:
        with torch.no_grad():
            return model(input_ids=ids[None]).logits[0]
    finally:
        for h in handles:
            h.remove()


def _masked_last_position(model: Any, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Logits ``[L, V]`` of a plain forward where every layer's down projection keeps, at the
    last position only, its top-k neurons by sqrt(sum_t (z_t/|z_t|)^2) over the positions
    before it (written out here, independently of griffin's scoring code)."""

    def hook(_m: Any, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        z = args[0].clone()
        earlier = z[0, :-1].double()
        unit = earlier / earlier.norm(dim=-1, keepdim=True)
        score = unit.pow(2).sum(dim=0).sqrt()
        keep = torch.topk(score, k).indices
        last = torch.zeros_like(z[0, -1])
        last[keep] = z[0, -1, keep]
        z[0, -1] = last
        return (z, *args[1:])

    return _forward_with_down_hook(model, ids, hook)


def _refit_last_position(model: Any, ids: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """Logits ``[L, V]`` where, at the last position only, every layer keeps its top-k neurons
    (statistic over the earlier positions, as in :func:`_masked_last_position`) and their down
    columns are ridge-refitted on the earlier positions: ``W' = W_S + W_D C^T`` with
    ``C = (G_SS + lam I)^-1 G_SD``, ``G = Z^T Z``, ``lam = alpha * mean(diag G_SS)``. Applied as
    the down input ``z_S`` plus the dropped neurons imputed as ``C z_S`` (then ``W z = W' z_S``).
    Written out here in float64, independently of griffin's compensation code."""

    def hook(_m: Any, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        z = args[0].clone()
        earlier = z[0, :-1].double()
        unit = earlier / earlier.norm(dim=-1, keepdim=True)
        keep = torch.topk(unit.pow(2).sum(dim=0).sqrt(), k).indices
        drop = torch.tensor([j for j in range(z.shape[-1]) if j not in set(keep.tolist())])
        gram = earlier.T @ earlier
        g_ss = gram[keep][:, keep]
        lam = alpha * float(g_ss.diagonal().mean())
        coef = torch.linalg.solve(g_ss + lam * torch.eye(k, dtype=g_ss.dtype), gram[keep][:, drop])
        last = z[0, -1].double()
        new = torch.zeros_like(last)
        new[keep] = last[keep]
        new[drop] = coef.T @ last[keep]
        z[0, -1] = new.to(z.dtype)
        return (z, *args[1:])

    return _forward_with_down_hook(model, ids, hook)


def _continuation_loglik(logits: torch.Tensor, ids: list[int], n_cont: int) -> float:
    logp = torch.log_softmax(logits.double(), dim=-1)
    return sum(
        float(logp[len(ids) - 1 - n_cont + i, ids[len(ids) - n_cont + i]]) for i in range(n_cont)
    )


def test_class_mode_equals_a_hand_computed_masked_forward(tiny_dir: Path, tasks_dir: Path) -> None:
    """class r=0.5 on one document equals a plain forward with hooks written here: full FF at
    every position but the last, whose FF keeps the top-18 neurons of the statistic over the
    earlier positions; the full column equals the unhooked forward. Catches a statistic that
    includes the last position, pruning every position (or none), a wrong k, and a request
    fed with the continuation's last token still attached."""
    report = _run(str(tiny_dir), tasks_dir, mode="class", ratios=[0.5], limit=1, compensate="none")
    model, tok = _load(tiny_dir), char_tokenizer()
    rows = report.sample_rows()
    assert len(rows) == len(MC_DOCS[0]["choices"])
    for row in rows:
        context, continuation = row["arguments"]
        ids = tok.encode(context + continuation)
        n_cont = len(tok.encode(continuation))
        inp = torch.tensor(ids[:-1])
        with torch.no_grad():
            full = _continuation_loglik(model(input_ids=inp[None]).logits[0], ids, n_cont)
        pruned = _continuation_loglik(_masked_last_position(model, inp, K_HALF), ids, n_cont)
        assert row["responses"]["full"][0] == pytest.approx(full, abs=1e-4)
        assert row["responses"]["class r=0.5"][0] == pytest.approx(pruned, abs=1e-4)
        assert abs(pruned - full) > 1e-4  # the reference really prunes something


def test_class_mode_with_refit_equals_a_hand_computed_ridge_refit(
    tiny_dir: Path, tasks_dir: Path
) -> None:
    """class r=0.5 --compensate refit --alpha 0.5 on one document equals hooks written here
    (top-k at the last position, kept down columns ridge-refitted on the earlier positions),
    and differs from plain class mode. Catches a refit fitted on positions that include the
    scored one, a ridge scaled differently, the option silently ignored, or the refit applied
    at every position."""
    report = _run(
        str(tiny_dir), tasks_dir, mode="class", ratios=[0.5], limit=1, compensate="refit", alpha=0.5
    )
    assert [s.name for s in report.settings] == ["full", "class r=0.5 refit"]
    model, tok = _load(tiny_dir), char_tokenizer()
    for row in report.sample_rows():
        context, continuation = row["arguments"]
        ids = tok.encode(context + continuation)
        n_cont = len(tok.encode(continuation))
        inp = torch.tensor(ids[:-1])
        refit = _continuation_loglik(_refit_last_position(model, inp, K_HALF, 0.5), ids, n_cont)
        plain = _continuation_loglik(_masked_last_position(model, inp, K_HALF), ids, n_cont)
        assert row["responses"]["class r=0.5 refit"][0] == pytest.approx(refit, abs=1e-4)
        assert abs(refit - plain) > 1e-4  # the refit really changes the pruned position


def test_compensate_is_refused_outside_class_mode(tiny_dir: Path, tasks_dir: Path) -> None:
    """--compensate applies to class mode only: gen and static refuse it in one line rather
    than silently evaluating without it. Catches the option dropped on the floor."""
    with pytest.raises(UsageError, match="--compensate refit applies to --mode class only"):
        _run(str(tiny_dir), tasks_dir, mode="gen", compensate="refit")
    with pytest.raises(UsageError, match="--compensate 'nope' is not known"):
        _run(str(tiny_dir), tasks_dir, mode="class", compensate="nope")


def test_class_ratio_one_reproduces_the_full_model_exactly(tiny_dir: Path, tasks_dir: Path) -> None:
    """--check: class at ratio 1.0 and the full column give, request for request, exactly the
    ``(log-likelihood, is_greedy)`` that lm-eval's own stock ``HFLM`` gives on the same model
    and tokenizer (the oracle outside griffin), and the r=0.5 column differs. Catches a mask
    that is not exactly 1 where nothing is dropped, class mode or the full column feeding a
    different input than lm-eval would (a dropped or extra token, another tokenisation), and
    a check that compares a column with itself."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    report = _run(
        str(tiny_dir), tasks_dir, mode="class", ratios=[0.5], check=True, compensate="none"
    )
    rows = report.sample_rows()
    n_requests = sum(len(d["choices"]) for d in MC_DOCS)
    assert len(rows) == n_requests
    oracle = HFLM(
        pretrained=_load(tiny_dir), tokenizer=AutoTokenizer.from_pretrained(tiny_dir), batch_size=1
    )
    requests = [
        Instance("loglikelihood", {}, tuple(row["arguments"]), i) for i, row in enumerate(rows)
    ]
    for row, (loglik, greedy) in zip(rows, oracle.loglikelihood(requests), strict=True):
        assert row["responses"]["full"] == [loglik, greedy]
        assert row["responses"]["check r=1"] == [loglik, greedy]
    assert report.check == {
        "compared": ["full", "check r=1"],
        "requests": n_requests,
        "equal": True,
        "max_abs_difference": 0.0,
    }
    assert _responses(report, "class r=0.5") != _responses(report, "full")


def test_static_ratio_one_export_equals_the_full_model(
    tiny_dir: Path, tasks_dir: Path, tmp_path: Path
) -> None:
    """static on a --ratio 1.0 export: every request's log-likelihood equals the original's,
    and a 0.5 export's differ. Catches evaluating the wrong model for a column (both columns
    the original, or the export scored with the other's tokenizer/weights)."""
    export(str(tiny_dir), ["Words of the prompt, a few."], ratio=1.0, out=tmp_path / "one")
    export(str(tiny_dir), ["Words of the prompt, a few."], ratio=0.5, out=tmp_path / "h")
    report = _run([str(tmp_path / "one"), str(tmp_path / "h")], tasks_dir)
    assert report.mode == "static"
    assert [s.name for s in report.settings] == ["full", "one", "h"]
    assert _responses(report, "one") == _responses(report, "full")
    assert _responses(report, "h") != _responses(report, "full")


def test_batch_size_rules(tiny_dir: Path, tasks_dir: Path, tmp_path: Path) -> None:
    """class and gen refuse --batch-size 2 (padding would enter the statistic) with one line
    naming the fix; static accepts it and scores the same as batch 1. Catches silently
    batching a per-request protocol, or a static batch path that mixes rows."""
    for mode in ("class", "gen"):
        with pytest.raises(UsageError, match="needs --batch-size 1"):
            _run(str(tiny_dir), tasks_dir, mode=mode, batch_size=2)
    export(str(tiny_dir), ["Words of the prompt."], ratio=0.5, out=tmp_path / "h")
    one = _run(str(tmp_path / "h"), tasks_dir, batch_size=1)
    two = _run(str(tmp_path / "h"), tasks_dir, batch_size=3)
    for a, b in zip(_responses(one, "h"), _responses(two, "h"), strict=True):
        assert a[0] == pytest.approx(b[0], abs=1e-4)


def test_modes_refuse_requests_they_cannot_serve(tiny_dir: Path, tasks_dir: Path) -> None:
    """loglikelihood_rolling and generate_until in class, multiple choice in gen, and static
    on a full model are refused with one line naming what to use instead. Catches serving
    them silently with a different protocol."""
    with pytest.raises(UsageError, match=r"loglikelihood_rolling.*--mode class"):
        _run(str(tiny_dir), tasks_dir, tasks=["tiny_rolling"], mode="class")
    with pytest.raises(UsageError, match=r"generate_until.*--mode gen"):
        _run(str(tiny_dir), tasks_dir, tasks=["tiny_gen"], mode="class")
    with pytest.raises(UsageError, match=r"multiple_choice.*--mode class"):
        _run(str(tiny_dir), tasks_dir, tasks=["tiny_mc"], mode="gen")
    with pytest.raises(UsageError, match="not one; make one with griffin export"):
        _run(str(tiny_dir), tasks_dir, mode="static")
    with pytest.raises(UsageError, match="not an lm-eval task"):
        _run(str(tiny_dir), tasks_dir, tasks=["no_such_task_here"])


def _greedy_reference(model: Any, prompt: list[int], k: int | None, n: int) -> list[int]:
    """Greedy tokens without a KV cache: every step re-runs the whole sequence; with ``k``,
    layer l keeps at generated positions only the top-k neurons of the statistic over the
    prompt positions (computed here), the prompt positions run the full FF."""
    T = len(prompt)

    def hook(_m: Any, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        z = args[0].clone()
        unit = z[0, :T].double() / z[0, :T].double().norm(dim=-1, keepdim=True)
        keep = torch.topk(unit.pow(2).sum(dim=0).sqrt(), k).indices
        mask = torch.zeros(z.shape[-1])
        mask[keep] = 1
        z[0, T:] = z[0, T:] * mask
        return (z, *args[1:])

    handles = (
        []
        if k is None
        else [b.mlp.down_proj.register_forward_pre_hook(hook) for b in model.model.layers]
    )
    ids = list(prompt)
    try:
        with torch.no_grad():
            for _ in range(n):
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    finally:
        for h in handles:
            h.remove()
    return ids[T:]


def test_gen_mode_equals_prompt_experts_without_a_cache(tiny_dir: Path, tasks_dir: Path) -> None:
    """gen r=0.5: each generated text equals a no-cache greedy reference whose generated
    positions keep the top-18 neurons chosen from the prompt; the full column equals
    transformers' own greedy generate; --check (ratio 1.0) equals full. Catches choosing
    experts from generated tokens, pruning the prefill, a broken KV cache in the decode loop,
    and stop sequences not honoured."""
    report = _run(str(tiny_dir), tasks_dir, tasks=["tiny_gen"], mode="gen", check=True)
    model, tok = _load(tiny_dir), char_tokenizer()
    rows = report.sample_rows()
    assert len(rows) == len(GEN_DOCS)
    for row in rows:
        prompt = tok.encode(row["arguments"][0])
        with torch.no_grad():
            hf = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
        expected_full = tok.decode(hf[0, len(prompt) :].tolist(), skip_special_tokens=True)
        reference = _greedy_reference(model, prompt, K_HALF, 6)
        pruned = tok.decode(reference, skip_special_tokens=True)
        assert row["responses"]["full"] == expected_full.split("\n")[0]
        assert row["responses"]["gen r=0.5"] == pruned.split("\n")[0]
    assert report.check["equal"]
    assert _responses(report, "gen r=0.5") != _responses(report, "full")


def test_cli_json_schema_and_log_samples(tiny_dir: Path, tasks_dir: Path, tmp_path: Path) -> None:
    """--json holds lm-eval's results per setting plus our settings; --log-samples has one
    line per request with every setting's log-likelihood. Catches a renamed/missing key, a
    setting absent from the log, and rows misaligned across settings."""
    log = tmp_path / "samples.jsonl"
    args = ["eval", "--model", str(tiny_dir), "--tasks", "tiny_mc", "--include-path"]
    args += [str(tasks_dir), "--ratio", "0.5", "--budget", "uniform,protect", "--limit", "2"]
    args += ["--compensate", "none"]
    result = CliRunner().invoke(app, [*args, "--json", "--log-samples", str(log)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    griffin = data["griffin"]
    assert {"version", "mode", "statistic", "settings", "tasks", "limit", "lm_eval_version"} <= set(
        griffin
    )
    assert griffin["mode"] == "class" and griffin["tasks"] == ["tiny_mc"]
    assert griffin["ratios"] == [0.5] and griffin["budgets"] == ["uniform", "protect"]
    names = [s["name"] for s in griffin["settings"]]
    assert names == ["full", "class r=0.5", "class r=0.5 protect"]
    protect = griffin["settings"][2]
    assert protect["budget"] == "protect" and protect["k_per_layer"] != [K_HALF] * 3
    assert sum(protect["k_per_layer"]) == 3 * K_HALF
    for name in names:
        task = data["results"][name]["results"]["tiny_mc"]
        assert 0.0 <= task["acc,none"] <= 1.0 and "acc_stderr,none" in task
        assert data["results"][name]["n-samples"]["tiny_mc"]["effective"] == 2
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 2 * 4
    for line in lines:
        assert set(line["responses"]) == set(names)
        context, continuation = line["arguments"]
        doc = MC_DOCS[line["doc_id"]]
        assert context == doc["context"] and continuation == " " + doc["choices"][line["request"]]


def test_cli_without_lm_eval_says_how_to_install(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without lm-eval installed: one red line with the install command, exit code 2, no
    traceback. Catches an ImportError escaping, or lm-eval imported when griffin loads."""
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    args = ["eval", "--model", str(tiny_dir), "--tasks", "griffin_wiki_next"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "pip install 'griffin-export[eval]'" in result.output
    assert "Traceback" not in result.output


def test_local_tasks_are_deterministic_and_true(tmp_path: Path) -> None:
    """The shipped tasks: the same files on every build; each document's labelled choice is
    the text that follows its context in the corpus, the three others are different texts.
    Catches a label pointing at a distractor, a non-deterministic shuffle, and distractors
    equal to the answer."""
    from griffin_export.evaluation.corpora import load_corpus
    from griffin_export.evaluation.tasks import LOCAL_TASKS, build_docs, prepare

    first = prepare(tmp_path / "a")
    second = prepare(tmp_path / "b")
    for name, task in LOCAL_TASKS.items():
        data = (first / f"{name}.jsonl").read_bytes()
        assert data == (second / f"{name}.jsonl").read_bytes()
        docs = build_docs(name)
        assert 500 <= len(docs) <= 1000
        text = load_corpus(task.corpus).text
        sep = " " if task.corpus == "wiki-summaries" else "\n"
        labels = {d.label for d in docs}
        assert labels == {0, 1, 2, 3}
        for doc in docs[:200]:
            answer = doc.choices[doc.label]
            assert doc.context + sep + answer in text
            assert len(set(doc.choices)) == 4


#: The text between a shipped task's context and its true choice in the corpus (a wiki lead's
#: sentences are joined by one space, a speech's lines by a newline): lm-eval's continuation is
#: this followed by the choice.
SHIPPED_SEPARATORS = {"griffin_wiki_next": " ", "griffin_shakespeare_next": "\n"}


@pytest.mark.slow
def test_embedded_model_on_the_shipped_tasks() -> None:
    """The embedded SmolLM2 on both shipped tasks (class mode, r=0.5, --check), judged by a
    loop written here over the tasks' own documents: each choice's log-likelihood is the sum
    of the model's log-probs of ``separator + choice`` after the context (no BOS, as the
    tokenizer encodes a text), under the plain model for ``full`` and under a forward whose
    last position keeps the top-k neurons of the earlier positions for ``class r=0.5``; the
    reported acc / acc_norm equal the argmax against the label of those sums. Catches the real
    tokenizer path diverging (a BOS added or dropped, the separator lost, the continuation
    split at a different token), documents served in another order than the task files, a
    label or acc computed from the wrong column, and the pruned column not pruning (or
    pruning every position) on a real model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from griffin_export.evaluation.tasks import build_docs
    from griffin_export.storage.sources import resolve_source

    limit = 6
    names = list(SHIPPED_SEPARATORS)
    report = evaluate_tasks(
        "smollm2-135m",
        tasks=names,
        mode="class",
        ratios=[0.5],
        limit=limit,
        check=True,
        compensate="none",
    )
    assert report.check is not None and report.check["equal"]
    assert report.check["requests"] == len(names) * limit * 4
    directory = resolve_source("smollm2-135m").directory
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(directory)
    k = keep_count(model.config.intermediate_size, 0.5)
    responses = {
        (row["task"], row["doc_id"], row["request"]): row["responses"]
        for row in report.sample_rows()
    }
    for name, sep in SHIPPED_SEPARATORS.items():
        hits = {"full": [0.0, 0.0], "class r=0.5": [0.0, 0.0]}  # acc, acc_norm
        for doc_id, doc in enumerate(build_docs(name)[:limit]):
            lls: dict[str, list[float]] = {"full": [], "class r=0.5": []}
            for index, choice in enumerate(doc.choices):
                n_context = len(tok(doc.context)["input_ids"])
                ids = tok(doc.context + sep + choice)["input_ids"]
                n_cont = len(ids) - n_context
                inp = torch.tensor(ids[:-1])
                with torch.no_grad():
                    full = _continuation_loglik(model(input_ids=inp[None]).logits[0], ids, n_cont)
                pruned = _continuation_loglik(_masked_last_position(model, inp, k), ids, n_cont)
                got = responses[(name, doc_id, index)]
                assert got["full"][0] == pytest.approx(full, abs=1e-3)
                assert got["class r=0.5"][0] == pytest.approx(pruned, abs=1e-3)
                assert abs(pruned - full) > 1e-3  # the last position really is pruned
                lls["full"].append(full)
                lls["class r=0.5"].append(pruned)
            for column, values in lls.items():
                norm = [v / len(c) for v, c in zip(values, doc.choices, strict=True)]
                hits[column][0] += values.index(max(values)) == doc.label
                hits[column][1] += norm.index(max(norm)) == doc.label
        for column, (acc, acc_norm) in hits.items():
            results = report.results[column]["results"][name]
            assert results["acc,none"] == pytest.approx(acc / limit)
            assert results["acc_norm,none"] == pytest.approx(acc_norm / limit)
