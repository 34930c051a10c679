"""``modalign eval`` as one Python call: :func:`run` takes the command's settings, evaluates,
writes the record and returns the table the command prints.

Settings are checked before anything heavy happens: a wrong task, split, tie rule, score, cut-off,
or a missing file or folder fails at once, without importing torch; bridge specs and inverted
query names are checked next, still before any tower is built or any data is encoded.

Examples:
    >>> import tempfile
    >>> from modalign.embed.store import EmbeddingStore
    >>> from modalign.evaluate.retrieval import toy_embeddings
    >>> store = EmbeddingStore(tempfile.mkdtemp())
    >>> for modality, emb in toy_embeddings(groups=40).items():
    ...     store.add_array(modality, emb.vectors, emb.items)
    >>> outcome = run(embeddings=store.path, task="retrieval", k=(1, 5), bootstrap=0)
    >>> outcome.path is None, outcome.result.task   # out=None: nothing written
    (True, 'retrieval')
    >>> print(outcome.table().splitlines()[0])  # doctest: +ELLIPSIS
      image → text recall@1  0...
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from modalign.errors import ModalignError, SmallDataWarning
from modalign.spec import split_key_value

TASKS: tuple[str, ...] = ("retrieval", "intra", "zeroshot", "ood", "compositional")
SPLIT_CHOICES: tuple[str, ...] = ("train", "val", "test", "all")
TieRule = Literal["pessimistic", "optimistic"]
TIES: tuple[TieRule, ...] = ("pessimistic", "optimistic")
SCORINGS: tuple[str, ...] = ("vector", "maxsim")
INDEXES: tuple[str, ...] = ("exact", "flat", "ivf", "hnsw")
OOD_SCORES: tuple[str, ...] = ("mcm", "energy", "max_logit", "knn")
"""The OOD scores (:data:`modalign.evaluate.ood.SCORES`, restated here so that checking the
settings does not import torch; a test keeps them equal)."""


@dataclass(frozen=True)
class EvalSettings:
    """Every setting of one evaluation (the options of ``modalign eval``); see :func:`run`."""

    model: str | None = None
    data: str | None = None
    embeddings: str | None = None
    task: str = "retrieval"
    split: str = "test"
    modalities: tuple[str, ...] = ("image", "text")
    modality: str = "image"
    query_view: str | None = None
    gallery_view: str | None = None
    relevance: str = "group"
    k: tuple[int, ...] = (1, 5, 10)
    ties: TieRule = "pessimistic"
    scoring: str = "vector"
    prefilter: int = 0
    index: str = "exact"
    label: str = "subgroup"
    templates: tuple[str, ...] | None = None
    class_embeddings: str | None = None
    out_data: str | None = None
    ood_values: str | None = None
    temperature: float = 1.0
    scores: tuple[str, ...] = OOD_SCORES
    knn_k: int = 1
    bridges: tuple[str, ...] = ()
    bank_split: str = "train"
    inverted: tuple[str, ...] = ()
    bootstrap: int = 1000
    seed: int = 0
    chunk_size: int = 1 << 22
    name: str | None = None
    progress: bool = False


@dataclass
class EvalOutcome:
    """What :func:`run` measured and wrote.

    Attributes:
        result: the task's :class:`~modalign.evaluate.retrieval.TaskResult` (metrics, protocol,
            per-query values).
        record: the result record (as written to ``path``).
        path: where the record was written, or ``None`` when ``out`` was ``None``.
        lines: the summary table, one line a metric, as ``modalign eval`` prints it.
    """

    result: Any
    record: dict[str, Any]
    path: Path | None
    lines: list[str] = field(default_factory=list)

    def table(self) -> str:
        """The summary table ``modalign eval`` prints (without the ``record:`` line)."""
        return "\n".join(self.lines)


def run(*, model: str | Path | None = None, data: str | Path | None = None,
        embeddings: str | Path | None = None, task: str = "retrieval", split: str = "test",
        modalities: str | Sequence[str] = ("image", "text"), modality: str = "image",
        query_view: str | None = None, gallery_view: str | None = None,
        relevance: str = "group", k: Sequence[int] = (1, 5, 10), ties: TieRule = "pessimistic",
        scoring: str = "vector", prefilter: int = 0, index: str = "exact",
        label: str = "subgroup", templates: Sequence[str] | None = None,
        class_embeddings: str | Path | None = None, out_data: str | None = None,
        ood_values: str | None = None, temperature: float = 1.0,
        scores: str | Sequence[str] = OOD_SCORES, knn_k: int = 1,
        bridges: Sequence[str] = (), bank_split: str = "train", inverted: Sequence[str] = (),
        bootstrap: int = 1000, seed: int = 0, chunk_size: int = 1 << 22,
        name: str | None = None, out: str | Path | None = None,
        progress: bool = False) -> EvalOutcome:
    """Run one evaluation of ``modalign eval`` and return its record and summary table.

    The arguments are the command's options (``--bridge`` -> ``bridges``, ``--template`` ->
    ``templates``, ``--inverted`` -> ``inverted``); ``modalities`` and ``scores`` also take the
    command's comma-separated strings. ``out`` is a record folder or ``.json`` file (``None``:
    the record is returned, not written). Warnings about small data are issued as
    :class:`~modalign.errors.SmallDataWarning`.

    Examples:
        >>> run(embeddings=".", split="validation")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        modalign.errors.ModalignError: --split 'validation': expected one of train, val, ...
    """
    s = EvalSettings(
        model=_text(model), data=_text(data), embeddings=_text(embeddings), task=task,
        split=split, modalities=_names(modalities), modality=modality, query_view=query_view,
        gallery_view=gallery_view, relevance=relevance, k=tuple(k), ties=ties, scoring=scoring,
        prefilter=prefilter, index=index, label=label,
        templates=tuple(templates) if templates else None,
        class_embeddings=_text(class_embeddings), out_data=out_data, ood_values=ood_values,
        temperature=temperature, scores=_names(scores), knn_k=knn_k, bridges=tuple(bridges),
        bank_split=bank_split, inverted=tuple(inverted), bootstrap=bootstrap, seed=seed,
        chunk_size=chunk_size, name=name, progress=progress)
    check_settings(s)
    return run_settings(s, out)


def run_settings(s: EvalSettings, out: str | Path | None = None) -> EvalOutcome:
    """Run checked settings (:func:`check_settings`); :func:`run` is the usual entry point."""
    import torch

    torch.manual_seed(s.seed)
    _check_specs(s)  # bridges and inverted names: torch is loaded, no tower yet
    if s.scoring == "maxsim":
        return _maxsim(s, out)
    if s.task == "ood":
        return _ood(s, out)
    from modalign.embed.joint import load_joint

    inverted = _resolve_inverted(s)  # before any tower runs: a wrong name fails at once
    joint = load_joint(model_dir=s.model, embeddings_dir=s.embeddings,
                       data=s.data if s.model else None, split=None, progress=s.progress)
    test = split_rows(joint, s.split, "--split")
    bank = split_rows(joint, s.bank_split, "--bank-split") if s.bridges else None
    from modalign.evaluate.inverted import align_inverted

    test, overrides, inversion = align_inverted(test, inverted, split=s.split)
    result = _evaluate(s, joint, test, bank, overrides, inversion)
    baseline = None
    if s.bootstrap and (s.bridges or overrides):
        baseline = _evaluate(s, joint, test, None, {}, None)
    outcome = _record(s, result, baseline, getattr(joint, "display_name", None), out)
    small_data_warnings(result, s.split)
    return outcome


# --------------------------------------------------------------------------------------------
# checks


def check_settings(s: EvalSettings) -> None:
    """Every check that needs neither torch nor data: choices, numbers, files and folders."""
    for option, value, choices in (("--task", s.task, TASKS), ("--split", s.split, SPLIT_CHOICES),
                                   ("--bank-split", s.bank_split, SPLIT_CHOICES),
                                   ("--ties", s.ties, TIES), ("--scoring", s.scoring, SCORINGS),
                                   ("--index", s.index, INDEXES)):
        if value not in choices:
            raise ModalignError(f"{option} {value!r}: expected one of {', '.join(choices)}")
    if s.model is None and s.embeddings is None:
        raise ModalignError("pass --model DIR (with --data DATA) or --embeddings DIR")
    if s.model is not None:
        resolve_model_dir(s.model)
        if s.data is None and s.embeddings is None:
            raise ModalignError("--model needs --data DATA (or --embeddings DIR of tower "
                                "features)")
    if s.embeddings is not None and not Path(s.embeddings).is_dir():
        raise ModalignError(f"--embeddings {s.embeddings}: no such folder")
    if s.model is not None and s.embeddings is None and s.data is not None:
        check_data(s.data if s.task != "ood" else _data_part(s.data), "--data")
    if not s.k or any(not isinstance(k, int) or k < 1 for k in s.k):
        raise ModalignError(f"--k {list(s.k)}: expected positive cut-offs")
    for option, number, low in (("--bootstrap", s.bootstrap, 0), ("--chunk-size", s.chunk_size, 1),
                                ("--prefilter", s.prefilter, 0), ("--knn-k", s.knn_k, 1)):
        if not isinstance(number, int) or number < low:
            hint = " (off) or a number of resamples such as 1000" if option == "--bootstrap" else ""
            raise ModalignError(f"{option} {number}: expected an integer >= {low}{hint}")
    if not (math.isfinite(s.temperature) and s.temperature > 0):
        raise ModalignError(f"--temperature {s.temperature}: expected a number > 0")
    if s.task == "retrieval":
        pair(s.modalities)
    for template in s.templates or ():
        if "{}" not in template:
            raise ModalignError(f"--template {template!r}: expected a '{{}}' where the class "
                                "name goes")
    if s.class_embeddings is not None and not Path(s.class_embeddings).is_file():
        raise ModalignError(f"--class-embeddings {s.class_embeddings}: no such file")
    if s.task in ("zeroshot", "ood") and s.model is None and s.class_embeddings is None:
        raise ModalignError(f"--task {s.task} with --embeddings needs class prototypes: pass "
                            "--model DIR (its text tower encodes the prompts) or "
                            "--class-embeddings FILE")
    if s.task == "compositional" and s.model is None:
        raise ModalignError("--task compositional needs --model DIR (its text tower encodes the "
                            "generated negative captions)")
    if s.scoring == "maxsim" and (s.task != "retrieval" or not s.model or not s.embeddings):
        raise ModalignError("--scoring maxsim: expected --task retrieval, --model (a late-"
                            "interaction model folder) and --embeddings (its token store)")
    if s.task == "ood":
        _check_ood(s)
    from modalign.evaluate.inverted import parse_inverted

    for spec in s.inverted:
        parse_inverted(spec)


def _check_ood(s: EvalSettings) -> None:
    unknown = [x for x in s.scores if x not in OOD_SCORES]
    if unknown or not s.scores:
        raise ModalignError(f"--scores {','.join(s.scores)!r}: expected some of "
                            f"{', '.join(OOD_SCORES)}")
    if s.ood_values:
        parse_ood_values(s.ood_values)
    elif s.out_data:
        if s.model is None:
            raise ModalignError("--out-data needs --model (its towers encode the OOD data)")
        check_data(_data_part(s.out_data), "--out-data")
    else:
        raise ModalignError("--task ood needs OOD inputs: --out-data DATA[:split] or "
                            "--ood-values LABEL=V1,V2")


def parse_ood_values(text: str) -> tuple[str, list[str]]:
    """``--ood-values LABEL=V1[,V2...]``: the label and the values held out as OOD.

    Examples:
        >>> parse_ood_values("group=Flags, Symbols")
        ('group', ['Flags', 'Symbols'])
    """
    expected = "LABEL=V1[,V2...], e.g. group=Flags"
    label, values = split_key_value(text, "--ood-values", expected)
    held = [v.strip() for v in values.split(",") if v.strip()]
    if not held:
        raise ModalignError(f"--ood-values {text!r}: expected {expected}")
    return label, held


def _check_specs(s: EvalSettings) -> None:
    """Bridge specs (built, so a learned bridge's file is read) and nothing heavier."""
    if s.bridges:
        from modalign.bridge.posthoc import build_chain

        build_chain(s.bridges)


def check_data(spec: str, option: str = "--data") -> None:
    """``emoji[:options]``, a dataset folder or a ``.csv``/``.jsonl`` manifest that exists.

    Examples:
        >>> check_data("emoji:limit=20")
        >>> check_data("missing.csv")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        modalign.errors.ModalignError: --data 'missing.csv': no such file
    """
    from modalign.data import parse_emoji_spec

    if spec == "emoji" or spec.startswith("emoji:"):
        parse_emoji_spec(spec)
        return
    path = Path(spec)
    if path.is_dir():
        return
    if path.suffix.lower() in (".csv", ".jsonl", ".ndjson"):
        if not path.is_file():
            raise ModalignError(f"{option} {spec!r}: no such file")
        return
    raise ModalignError(f"{option} {spec!r}: expected 'emoji', a .csv/.jsonl manifest, or a "
                        "dataset folder")


def resolve_model_dir(path: str | Path, option: str = "--model") -> Path:
    """``path`` as a model folder, with a hint when a run folder was given instead.

    Examples:
        >>> resolve_model_dir("no/such/folder")
        Traceback (most recent call last):
        ...
        modalign.errors.ModalignError: --model no/such/folder: no such folder
    """
    p = Path(path)
    if not p.is_dir():
        raise ModalignError(f"{option} {p}: no such folder")
    if (p / "config.json").is_file():
        return p
    if (p / "model" / "config.json").is_file():
        raise ModalignError(f"{option} {p}: a run folder, not a model folder; pass "
                            f"{option} {p / 'model'}")
    raise ModalignError(f"{option} {p}: not a model folder (expected config.json and "
                        "model.safetensors, as written by 'modalign train')")


def pair(modalities: Sequence[str]) -> tuple[str, str]:
    """The two different modalities of a cross-modal retrieval."""
    names = _names(modalities)
    if len(names) != 2 or names[0] == names[1]:
        raise ModalignError(f"--modalities {','.join(names)!r}: expected two different "
                            "modalities, e.g. image,text")
    return names[0], names[1]


# --------------------------------------------------------------------------------------------
# the tasks


def split_rows(joint: Mapping[str, Any], split: str, option: str = "--split") -> dict[str, Any]:
    """The rows of ``split`` (``all``: every row), with a clear error when one is empty."""
    if split == "all":
        return dict(joint)
    out = {m: e.filter(split=split) for m, e in joint.items()}
    for m, e in out.items():
        if len(e) == 0:
            present = sorted({it.get("split", "") for it in joint[m].items})
            raise ModalignError(f"{option} {split!r}: the {m} items have no rows in that split "
                                f"(splits present: {present}); pass {option} all to use every "
                                "row")
    return out


def _evaluate(s: EvalSettings, joint: Mapping[str, Any], test: Mapping[str, Any],
              bank: Mapping[str, Any] | None, overrides: Mapping[str, Any],
              inversion: Mapping[str, Any] | None) -> Any:
    bridges = list(s.bridges) if bank is not None else []
    common: dict[str, Any] = {"bridges": bridges, "ties": s.ties, "chunk_size": s.chunk_size}
    if s.task == "retrieval":
        from modalign.evaluate.retrieval import cross_modal_retrieval

        return cross_modal_retrieval(test, pair(s.modalities), relevance=s.relevance,
                                     k_values=s.k, bank=bank, queries_override=overrides,
                                     inversion=inversion, progress=s.progress, index=s.index,
                                     **common)
    if s.task == "intra":
        from modalign.evaluate.retrieval import intra_modal_retrieval

        return intra_modal_retrieval(
            modality_rows(test, s.modality), s.modality, query_view=s.query_view,
            gallery_view=s.gallery_view, relevance=s.relevance, k_values=s.k,
            bank=bank[s.modality] if bank is not None else None, queries_override=overrides,
            inversion=inversion, progress=s.progress, index=s.index, **common)
    if s.task == "compositional":
        from modalign.evaluate.compositional import compositional_task

        return compositional_task(str(s.model), test, s.modality, split=s.split, seed=s.seed)
    from modalign.evaluate.zeroshot import default_templates, zero_shot_task

    return zero_shot_task(
        joint, test, bank, modality=s.modality, label=s.label,
        templates=s.templates or default_templates(str(s.data or "")),
        class_embeddings=s.class_embeddings, model_dir=s.model, bridges=bridges,
        query_override=overrides.get(s.modality), inversion=inversion, ties=s.ties,
        chunk_size=s.chunk_size)


def modality_rows(embeddings: Mapping[str, Any], modality: str) -> Any:
    """``embeddings[modality]``, with an error naming ``--modality`` when it is absent."""
    if modality not in embeddings:
        raise ModalignError(f"--modality {modality!r}: not among the embeddings "
                            f"({sorted(embeddings)})")
    return embeddings[modality]


def _resolve_inverted(s: EvalSettings) -> dict[str, tuple[Any, str]]:
    """``inverted`` values -> query key -> (store, array name), resolved before loading."""
    if not s.inverted:
        return {}
    from modalign.embed.store import EmbeddingStore
    from modalign.evaluate.inverted import resolve_inverted_queries
    from modalign.io import cached_file_hash

    if s.embeddings is not None:
        store = EmbeddingStore(s.embeddings)
    else:
        from modalign.data import load_dataset
        from modalign.embed.paths import default_store_dir

        store = EmbeddingStore(default_store_dir(load_dataset(str(s.data)), _towers(s.model)))
    weights = (cached_file_hash(Path(str(s.model)) / "model.safetensors") if s.model is not None
               else None)
    return resolve_inverted_queries(s.inverted, store, split=s.split, model_weights=weights)


def _towers(model_dir: str | None) -> dict[str, str]:
    """The tower specs in a model folder's config (read, no tower built)."""
    from modalign.io import read_json

    meta = read_json(Path(str(model_dir)) / "config.json")
    return dict((meta.get("model") or {}).get("towers") or {})


def _ood(s: EvalSettings, out: str | Path | None) -> EvalOutcome:
    """``task="ood"``: ID inputs from ``data``, OOD inputs from ``out_data`` or ``ood_values``."""
    from modalign.evaluate.ood import ood_task
    from modalign.evaluate.records import make_record, write_record

    result, dataset = ood_task(s)
    metrics = {k: v for k, v in result.metrics.items() if not k.endswith(("_lo", "_hi"))}
    intervals = {k: [result.metrics[f"{k}_lo"], result.metrics[f"{k}_hi"]] for k in metrics
                 if f"{k}_lo" in result.metrics}
    record = make_record(dataset=dataset, split=s.split, model=s.model or
                         f"embeddings:{s.embeddings}", task=result.task,
                         protocol=result.protocol, metrics=metrics, seed=s.seed,
                         name=s.name, intervals=intervals,
                         bootstrap=result.protocol.get("intervals"))
    path = write_record(record, out) if out is not None else None
    lines = []
    for key, value in metrics.items():
        if key.endswith(("/auroc", "/fpr@95tpr", "/aupr_in")) or key == "id_acc1":
            lo_hi = intervals.get(key)
            ci = f"  [{lo_hi[0]:.4f}, {lo_hi[1]:.4f}]" if lo_hi else ""
            lines.append(f"  {key:<20}  {value:.4f}{ci}")
    return EvalOutcome(result, record, path, lines)


def _maxsim(s: EvalSettings, out: str | Path | None) -> EvalOutcome:
    """``scoring="maxsim"``: late-interaction retrieval, one record."""
    from modalign.evaluate.records import make_record, write_record
    from modalign.evaluate.retrieval import TaskResult
    from modalign.late.model import evaluate_late

    found = evaluate_late(str(s.model), str(s.embeddings), split=s.split, k_values=s.k,
                          prefilter=s.prefilter)
    protocol = {**{k: v for k, v in found.items() if k != "metrics"}, "scoring": "maxsim"}
    record = make_record(dataset=Path(str(s.embeddings)).name, split=s.split,
                         model=str(s.model), task="retrieval:maxsim", protocol=protocol,
                         metrics=found["metrics"], seed=s.seed)
    path = write_record(record, out) if out is not None else None
    width = max(len(k) for k in found["metrics"])
    lines = [f"  {key:<{width}}  {value:.4f}" for key, value in found["metrics"].items()]
    return EvalOutcome(TaskResult("retrieval:maxsim", dict(found["metrics"]), protocol),
                       record, path, lines)


# --------------------------------------------------------------------------------------------
# record and table


def _record(s: EvalSettings, result: Any, baseline: Any | None, store_name: str | None,
            out: str | Path | None) -> EvalOutcome:
    from modalign.evaluate.bootstrap import bootstrap_intervals, paired_bootstrap
    from modalign.evaluate.records import make_record, write_record
    from modalign.naming import dataset_name

    intervals: dict[str, tuple[float, float]] = {}
    comparisons = []
    boot = None
    if s.bootstrap:
        boot = {"samples": s.bootstrap, "seed": s.seed, "level": 0.95, "unit": "query",
                "method": "percentile"}
        intervals = bootstrap_intervals(result.per_query, samples=s.bootstrap, seed=s.seed)
        if baseline is not None:
            what = [w for w, on in (("bridges", bool(s.bridges)),
                                    ("inverted queries", bool(result.inversion))) if on]
            comparisons.append({
                "baseline": "native", "treatment": " + ".join(what), "paired": True,
                "differences": paired_bootstrap(result.per_query, baseline.per_query,
                                                samples=s.bootstrap, seed=s.seed)})
    model = s.model or f"embeddings:{s.embeddings}"
    dataset = store_name or (dataset_name(s.data) if s.data else Path(str(s.embeddings)).name)
    record = make_record(dataset=dataset, split=s.split, model=model, task=result.task,
                         protocol=result.protocol, metrics=result.metrics,
                         bridges=result.bridges, inversion=result.inversion, seed=s.seed,
                         name=s.name, intervals=intervals, bootstrap=boot,
                         comparisons=comparisons)
    path = write_record(record, out) if out is not None else None
    lines = summary_lines(result, intervals, comparisons,
                          pair(s.modalities) if s.task == "retrieval" else None)
    return EvalOutcome(result, record, path, lines)


def summary_lines(result: Any, intervals: Mapping[str, Any], comparisons: list[dict[str, Any]],
                  modalities: tuple[str, str] | None) -> list[str]:
    """The headline metrics, directions in words, with intervals and paired differences."""
    from modalign.vocabulary import describe_metric

    headline = re.compile(r"(_retrieval_recall@\d+|_map|_mrr|^acc1|^acc5|^mean_per_class_recall)$")
    shown = [k for k in result.metrics if headline.search(k)]
    directions = result.protocol.get("directions", [])
    queries = modalities or {d["gallery"]: d["query"] for d in directions}
    labels = {k: describe_metric(k, queries) for k in shown}
    width = max((len(v) for v in labels.values()), default=0)
    diffs = comparisons[0]["differences"] if comparisons else {}
    lines = []
    for key in shown:
        value = result.metrics[key]
        line = f"  {labels[key]:<{width}}  {value:.4f}"
        if key in intervals:
            lo, hi = intervals[key]
            line += f"  [{lo:.4f}, {hi:.4f}]"
        if key in diffs:
            d = diffs[key]
            lo, hi = d["interval"]
            verdict = "" if lo <= 0.0 <= hi else "  *"
            line += f"  vs native {d['difference']:+.4f} [{lo:+.4f}, {hi:+.4f}]{verdict}"
        lines.append(line)
    if intervals:
        lines.append("  [..]: 95% bootstrap interval over queries"
                     + ("; vs native: paired difference, * where the interval excludes 0"
                        if diffs else ""))
    return lines


def small_data_warnings(result: Any, split: str, minimum: int = 30) -> None:
    """Say so when a metric rests on fewer than ``minimum`` queries."""
    counts = [(f"{d['query']} → {d['gallery']}", d["num_queries"])
              for d in result.protocol.get("directions", [])]
    if "num_inputs" in result.protocol:
        counts.append(("zero-shot", result.protocol["num_inputs"]))
    small = [f"{name}: {n}" for name, n in counts if n < minimum]
    if small:
        more = ("" if split == "all" else
                "; a 'split' column in the manifest or --split all gives more")
        warnings.warn(f"few queries ({', '.join(small)}) in split {split!r}: read the "
                      f"intervals, not the third decimal{more}", SmallDataWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------
# helpers


def _text(value: str | Path | None) -> str | None:
    return None if value is None else str(value)


def _names(value: str | Sequence[str]) -> tuple[str, ...]:
    parts = value.split(",") if isinstance(value, str) else value
    return tuple(p.strip() for p in parts if p.strip())


def _data_part(spec: str) -> str:
    """``DATA`` of ``DATA[:split]`` (the form ``--task ood`` takes)."""
    return data_and_split(spec, "test")[0]


def data_and_split(spec: str, default_split: str) -> tuple[str, str | None]:
    """``"DATA:split"`` -> ``(DATA, split)`` (``None`` for ``all``); a suffix that is not a
    split stays in DATA.

    Examples:
        >>> data_and_split("items.csv:val", "test"), data_and_split("emoji", "test")
        (('items.csv', 'val'), ('emoji', 'test'))
    """
    head, sep, tail = spec.rpartition(":")
    data, split = (head, tail) if sep and tail in SPLIT_CHOICES else (spec, default_split)
    return data, None if split == "all" else split
