"""``griffin eval``: task accuracy through EleutherAI's lm-evaluation-harness, the full model
beside every pruned setting on the same requests in the same run.

Modes (what "pruned" means for each setting):

* ``static``: an export directory as it is (every token through its smaller FF; any budget,
  loaded with :func:`griffin_export.load_pretrained`), beside the export's original.
* ``class``: GRIFFIN's classification mode on the full model, read from the authors' code.
  For each log-likelihood request the model input is ``(context + continuation)[:-1]``;
  every layer scores its neurons with the GRIFFIN statistic over all input positions but the
  last, keeps its top-k, and only the last position runs with those experts (every earlier
  position uses the full FF). A one-token continuation is thus predicted by the pruned model
  with experts chosen from the context; of a longer continuation only the last token is. It
  needs batch 1 (padding would enter the statistic). Only ``loglikelihood`` requests
  (multiple-choice tasks) can be served.
* ``gen``: ``generate_until`` requests on the full model: a full prefill of the whole prompt
  chooses every layer's experts, then greedy decoding runs with only those (optionally
  re-chosen every N generated tokens from the last W positions, as the refresh runtime does).
  Batch 1; the full model decodes with the same loop.

lm-eval is an optional dependency (``pip install 'griffin-export[eval]'``), imported only
here, lazily. griffin's own offline tasks (:mod:`griffin_export.evaluation.tasks`) are
prepared into the cache before each run; any other lm-eval task name works where its data
are reachable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from griffin_export._version import __version__
from griffin_export.core.architectures import ArchSpec
from griffin_export.core.budgets import check_budget
from griffin_export.core.compensation import Compensation, check_alpha
from griffin_export.core.moe import has_down_bias
from griffin_export.core.scoring import (
    STATISTIC_NAME,
    check_ratio,
)
from griffin_export.errors import GriffinError, UsageError
from griffin_export.evaluation.eval_modes import (
    MODES,
    SERVES,
    EvalSetting,
    adaptive_settings,
    compensation_for,
    moe_adaptive_settings,
)
from griffin_export.evaluation.tasks import LOCAL_TASKS, prepare
from griffin_export.formats.exports import is_export, load_original, open_export
from griffin_export.formats.verify import check_original_model
from griffin_export.storage.loading import load_model, parse_dtype, require_tokenizer
from griffin_export.storage.sources import cache_dir, resolve_source

INSTALL_HINT = "pip install 'griffin-export[eval]'"
#: What to use instead, per mode, when a task asks for a request type the mode cannot serve.
_INSTEAD = {
    "class": "use --mode gen for generate_until tasks, or an export with --mode static",
    "gen": "use --mode class for multiple-choice tasks, or an export with --mode static",
}


class CheckFailedError(GriffinError):
    """A built-in cross-check (``--check``) found a difference."""


def require_lm_eval() -> Any:
    """Import lm-eval or raise one line saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise UsageError(
            f"griffin eval needs lm-evaluation-harness, which is not installed; {INSTALL_HINT}"
        ) from None
    return lm_eval


# -- tasks -------------------------------------------------------------------------------------


def task_manager(names: Sequence[str], include_path: Sequence[str | Path] = ()) -> Any:
    """An lm-eval ``TaskManager`` that knows ``names``: griffin's local tasks (prepared in the
    cache) and ``include_path`` folders first, lm-eval's ~14k built-in tasks only when a name
    is not found there (indexing them takes seconds)."""
    from lm_eval.tasks import TaskManager

    for folder in include_path:
        if not Path(folder).is_dir():
            raise UsageError(f"--include-path '{folder}' is not a directory of task YAML files")
    local = [n for n in names if n in LOCAL_TASKS]
    paths = [str(p) for p in include_path]
    if local:
        paths.insert(0, str(prepare(cache_dir() / "tasks", local)))
    manager = TaskManager(include_path=paths or None, include_defaults=False)
    if not all(n in manager.all_tasks for n in names):
        manager = TaskManager(include_path=paths or None, include_defaults=True)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UsageError(
            f"--tasks '{','.join(unknown)}' is not an lm-eval task here; griffin's offline tasks "
            f"are {', '.join(LOCAL_TASKS)}, or pass --include-path DIR with your task YAML"
        )
    return manager


def check_request_types(mode: str, manager: Any, names: Sequence[str]) -> None:
    """Refuse, before any model runs, a task whose requests ``mode`` cannot serve."""
    loaded = manager.load(list(names))["tasks"]
    for name, task in loaded.items():
        kind = task.get_config("output_type")
        if kind not in SERVES[mode]:
            raise UsageError(
                f"task '{name}' sends {kind} requests, which --mode {mode} cannot serve "
                f"({mode} serves {', '.join(SERVES[mode])}); {_INSTEAD[mode]}"
            )


# -- report ------------------------------------------------------------------------------------


@dataclass
class MetricRow:
    task: str
    metric: str
    values: dict[str, tuple[float, float | None]]  # setting -> (value, stderr)


@dataclass
class TaskEvalReport:
    """lm-eval's results per setting, with our settings and run parameters."""

    mode: str
    model: str
    tasks: list[str]
    settings: list[EvalSetting]
    results: dict[str, dict[str, Any]]  # setting name -> lm-eval's results (no samples)
    samples: dict[str, dict[str, list[dict[str, Any]]]]  # setting -> task -> lm-eval samples
    seconds: dict[str, float]
    params: dict[str, Any] = field(default_factory=dict)
    check: dict[str, Any] | None = None

    def metric_rows(self) -> list[MetricRow]:
        """Every (task, metric) with each setting's value and standard error."""
        rows: dict[tuple[str, str], MetricRow] = {}
        for setting in self.settings:
            per_task = self.results[setting.name].get("results", {})
            for task in self.tasks:
                for key, value in per_task.get(task, {}).items():
                    metric, comma, filt = key.partition(",")
                    if not comma or metric.endswith("_stderr") or not _is_number(value):
                        continue
                    err = per_task[task].get(f"{metric}_stderr,{filt}")
                    label = metric if filt in ("", "none") else f"{metric} ({filt})"
                    row = rows.setdefault((task, label), MetricRow(task, label, {}))
                    row.values[setting.name] = (
                        float(value),
                        float(err) if _is_number(err) else None,
                    )
        return list(rows.values())

    def sample_rows(self) -> list[dict[str, Any]]:
        """One row per request: task, document, request index, its arguments and target, and
        each setting's response side by side (``[log-likelihood, is_greedy]`` or text)."""
        first = self.settings[0].name
        out = []
        for task in self.tasks:
            per_setting = {
                s.name: {doc["doc_id"]: doc for doc in self.samples[s.name].get(task, [])}
                for s in self.settings
            }
            for doc_id, doc in per_setting[first].items():
                for index, args in enumerate(_request_arguments(doc)):
                    out.append(
                        {
                            "task": task,
                            "doc_id": doc_id,
                            "request": index,
                            "arguments": args,
                            "target": doc.get("target"),
                            "responses": {
                                name: _plain(docs[doc_id]["resps"][index][0])
                                for name, docs in per_setting.items()
                            },
                        }
                    )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "griffin": {
                "version": __version__,
                "mode": self.mode,
                "model": self.model,
                "tasks": self.tasks,
                "statistic": STATISTIC_NAME,
                "settings": [s.to_dict() for s in self.settings],
                "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
                **self.params,
            },
            "check": self.check,
            "results": self.results,
        }


def _request_arguments(doc: dict[str, Any]) -> list[list[Any]]:
    """The ``(context, continuation)`` / ``(context, gen_kwargs)`` of each request of an
    lm-eval sample, in request order."""
    args = doc.get("arguments", {})
    if isinstance(args, dict):
        return [list(v.values()) if isinstance(v, dict) else [v] for v in args.values()]
    return [list(a) for a in args]


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _responses(report: TaskEvalReport, name: str) -> list[Any]:
    return [row["responses"][name] for row in report.sample_rows()]


def compare_responses(report: TaskEvalReport, a: str, b: str) -> dict[str, Any]:
    """Per-request comparison of settings ``a`` and ``b``: log-likelihoods (or generated
    texts) equal bit for bit?"""
    left, right = _responses(report, a), _responses(report, b)
    diffs = [
        abs(x[0] - y[0]) if isinstance(x, list) and isinstance(y, list) else float(x != y)
        for x, y in zip(left, right, strict=True)
    ]
    return {
        "compared": [a, b],
        "requests": len(diffs),
        "equal": all(x == y for x, y in zip(left, right, strict=True)),
        "max_abs_difference": max(diffs, default=0.0),
    }


# -- the command -------------------------------------------------------------------------------


def evaluate_tasks(
    model: str | Sequence[str],
    *,
    tasks: Sequence[str],
    mode: str | None = None,
    original: str | None = None,
    ratios: Sequence[float] | None = None,
    budgets: Sequence[str] | None = None,
    refresh: int = 0,
    window: int | None = None,
    include_path: Sequence[str | Path] = (),
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    max_gen_tokens: int | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    check: bool = False,
    compensate: str | None = None,
    alpha: float | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    experts: float | None = None,
) -> TaskEvalReport:
    """Evaluate ``tasks`` with lm-eval: the full model and every pruned setting of ``mode``
    (default ``static`` for export directories, ``class`` for a full model) on the same
    requests, one lm-eval run per setting.

    ``model``: one full model (``class``, ``gen``), or one or more export directories of the
    same original (``static``: the original runs once, beside each export).
    ``check`` adds a ratio-1.0 setting to ``class``/``gen`` and raises
    :class:`CheckFailedError` unless it reproduces the full model's log-likelihoods (texts)
    exactly; the comparison is in ``report.check``. ``compensate`` (class mode) repairs the
    pruned position as ``griffin ppl`` does; None is
    :data:`~griffin_export.core.compensation.DEFAULT_METHOD` in class mode, none elsewhere
    (any other method is refused there).

    On a mixture of experts, ``class`` and ``gen`` choose experts and their neurons from
    each request's context as ``griffin export`` does (``experts``: the fraction of routed
    experts kept per layer, default 1.0, beside ``ratios``), and run the sliced layers where
    the mode prunes (:mod:`griffin_export.evaluation.moe_protocol`); ``refresh``, ``window``
    and budgets other than uniform are refused there.
    """
    require_lm_eval()

    report = progress or (lambda stage, done, total: None)
    names = _check_options(tasks, limit, num_fewshot, batch_size, refresh, window, max_gen_tokens)
    sources = [model] if isinstance(model, str) else list(model)
    if not sources:
        raise UsageError("no model given; pass a model or one or more export directories")
    exported = [is_export(m) for m in sources]
    mode = mode or ("static" if all(exported) else "class")
    compensate = compensation_for(mode, compensate)
    if alpha is not None:
        check_alpha(alpha)
    if experts is not None:
        check_ratio(experts, "--experts")
    if mode not in MODES:
        raise UsageError(f"--mode '{mode}' is not known; use one of {', '.join(MODES)}")
    if mode == "static":
        if not all(exported):
            plain = sources[exported.index(False)]
            raise UsageError(
                f"--mode static evaluates export directories, and '{plain}' is not one; make "
                "one with griffin export, or use --mode class on a full model"
            )
        if experts not in (None, 1.0):
            raise UsageError(
                f"--experts {experts:g} applies to --mode class and gen; an export's experts "
                "were fixed by griffin export: drop --experts"
            )
        if ratios or budgets or refresh or check:
            raise UsageError(
                "--ratio, --budget, --refresh and --check apply to --mode class and gen; an "
                "export's recipe was fixed by griffin export"
            )
    else:
        if len(sources) != 1 or exported[0]:
            raise UsageError(
                f"--mode {mode} prunes one full model request by request, got "
                f"{', '.join(map(repr, sources))}: pass the original model instead of an "
                "export, or use --mode static"
            )
        if mode == "class" and (refresh or window is not None):
            raise UsageError("--refresh and --window apply to --mode gen")
        if batch_size != 1:
            raise UsageError(
                f"--mode {mode} needs --batch-size 1 (experts are chosen per request, and "
                f"padding would enter the statistic), got {batch_size}"
            )
        for ratio in ratios or (0.5,):
            check_ratio(ratio)
        for budget in budgets or ("uniform",):
            check_budget(budget)

    manager = task_manager(names, include_path)
    check_request_types(mode, manager, names)

    report("load", 0, len(sources))
    models: dict[str, tuple[nn.Module, ArchSpec, Any]] = {}
    settings: list[EvalSetting]
    if mode == "static":
        exports = [open_export(m, device) for m in sources]
        full = load_original(exports[0].directory, exports[0].manifest, original, device)
        settings = [EvalSetting("full", "plain")]
        for source, export in zip(sources, exports, strict=True):
            check_original_model(export.directory, full.model)
            name = Path(source).resolve().name
            if name in models or name == "full":
                name = str(source)
            models[name] = (export.loaded.model, export.spec, export.loaded.tokenizer)
            manifest = export.manifest
            settings.append(
                EvalSetting(
                    name,
                    "plain",
                    name,
                    manifest.get("ratio"),
                    manifest.get("budget", "uniform"),
                    tuple(manifest["k_per_layer"]),
                )
            )
    else:
        full = load_model(resolve_source(sources[0]), parse_dtype(dtype), device)
        n_layers = len(full.spec.blocks(full.model))
        if full.spec.moe is not None:
            _check_moe(mode, budgets, refresh, window)
            how = Compensation(compensate, 1.0 if alpha is None else alpha)
            how.check_model(has_down_bias(full.spec, full.model), full.model_type)
            settings = moe_adaptive_settings(
                mode,
                full.spec,
                full.model,
                list(ratios or (0.5,)),
                1.0 if experts is None else experts,
                check,
                compensate,
                alpha,
            )
        elif experts not in (None, 1.0):
            raise UsageError(
                f"--experts {experts:g} keeps routed experts of a mixture of experts; "
                f"'{full.model_type}' is a dense model: drop --experts"
            )
        else:
            settings = adaptive_settings(
                mode,
                n_layers,
                full.spec.d_ff(full.model.config),
                list(ratios or (0.5,)),
                list(budgets or ("uniform",)),
                refresh,
                window,
                check,
                compensate,
                alpha,
            )
    models["full"] = (full.model, full.spec, full.tokenizer)
    report("load", len(sources), len(sources))
    tokenizer = require_tokenizer(
        full.tokenizer or next((t for _, _, t in models.values() if t), None), sources[0]
    )

    from lm_eval import evaluator

    from griffin_export.evaluation.lmeval_bridge import GriffinLM

    results: dict[str, dict[str, Any]] = {}
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {}
    seconds: dict[str, float] = {}
    for i, setting in enumerate(settings):
        report("eval", i, len(settings))
        net, spec, own_tokenizer = models[setting.model]
        lm = GriffinLM(
            net,
            own_tokenizer or tokenizer,
            spec,
            setting,
            batch_size=batch_size,
            max_gen_tokens=max_gen_tokens,
        )
        started = time.perf_counter()
        out = evaluator.simple_evaluate(
            model=lm,
            tasks=list(names),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=True,
        )
        seconds[setting.name] = time.perf_counter() - started
        if out is None:  # only on non-zero ranks of a distributed run
            raise UsageError("lm-eval returned no results (a distributed launch?); run it alone")
        samples[setting.name] = out.pop("samples", {})
        results[setting.name] = {
            key: out[key]
            for key in ("results", "versions", "n-shot", "higher_is_better", "n-samples")
            if key in out
        }
    report("eval", len(settings), len(settings))
    result = TaskEvalReport(
        mode=mode,
        model=", ".join(map(str, sources)),
        tasks=list(names),
        settings=settings,
        results=results,
        samples=samples,
        seconds=seconds,
        params={
            "original": original,
            "ratios": None if mode == "static" else list(ratios or (0.5,)),
            "budgets": None if mode == "static" else list(budgets or ("uniform",)),
            "experts": experts,
            "limit": limit,
            "num_fewshot": num_fewshot,
            "batch_size": batch_size,
            "refresh": refresh,
            "window": window,
            "max_gen_tokens": max_gen_tokens,
            "device": device,
            "lm_eval_version": _lm_eval_version(),
        },
    )
    if check:
        result.check = compare_responses(result, "full", "check r=1")
        if not result.check["equal"]:
            raise CheckFailedError(
                f"--check failed: {mode} at ratio 1.0 differs from the full model on "
                f"{result.check['requests']} requests (largest difference "
                f"{result.check['max_abs_difference']:.3g}); please report it"
            )
    return result


def _check_moe(mode: str, budgets: Sequence[str] | None, refresh: int, window: int | None) -> None:
    """Refuse what ``class``/``gen`` on a mixture of experts do not take."""
    if budgets and list(budgets) != ["uniform"]:
        raise UsageError(
            f"--budget {','.join(budgets)} is for dense models; a mixture of experts keeps one "
            "width per kind of FF (one config field each): drop --budget"
        )
    if refresh or window is not None:
        raise UsageError(
            f"--refresh and --window re-choose neurons of dense FF layers; --mode {mode} on a "
            "mixture of experts chooses once, from the prompt: drop them"
        )


def _check_options(
    tasks: Sequence[str],
    limit: int | None,
    num_fewshot: int | None,
    batch_size: int,
    refresh: int,
    window: int | None,
    max_gen_tokens: int | None,
) -> list[str]:
    names = [t.strip() for item in tasks for t in item.split(",") if t.strip()]
    if not names:
        raise UsageError(
            "--tasks is empty; e.g. --tasks griffin_wiki_next,griffin_shakespeare_next"
        )
    for option, value, least in (
        ("--limit", limit, 1),
        ("--num-fewshot", num_fewshot, 0),
        ("--batch-size", batch_size, 1),
        ("--refresh", refresh, 0),
        ("--window", window, 1),
        ("--max-gen-tokens", max_gen_tokens, 1),
    ):
        if value is not None and (not isinstance(value, int) or value < least):
            raise UsageError(f"{option} must be an integer >= {least}, got {value!r}")
    return list(dict.fromkeys(names))


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
