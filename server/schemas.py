"""Wire schemas of the HTTP API (requests validated by pydantic; responses documented)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# A text with something in it: empty and blank texts are refused by the schema itself.
Text = Annotated[str, StringConstraints(min_length=1, pattern=r"\S")]
Inputs = Text | Annotated[list[Text], Field(min_length=1)]


class LongInputBody(BaseModel):
    """How an input longer than one window is read."""

    model_config = ConfigDict(extra="forbid")
    strategy: Literal["truncate", "chunk"] = Field(
        "chunk", description="truncate: keep one window (the response says what was dropped); chunk: "
        "overlapping windows on token boundaries, each encoded once, then aggregated."
    )  # fmt: skip
    window: int | None = Field(
        None, ge=8, le=512, description="Tokens per window, [CLS] and [SEP] included. Default: the whole "
        "text when it fits the model, else the model's trained window (256 tokens if none)."
    )  # fmt: skip
    stride: int | None = Field(
        None, ge=1, description="Text tokens between window starts (default: overlap of 32 tokens)."
    )
    side: Literal["right", "left"] = Field("right", description="truncate: the end that is cut.")


LongInput = Literal["truncate", "chunk"] | LongInputBody


class ClassifyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: Inputs = Field(description="A text or a list of texts.", examples=["A gripping, beautiful film."])
    model: str | None = Field(None, description="A classification model of /v1/models; default: the first.")
    top_k: int = Field(
        1, ge=1, description="How many labels to return per input, best first (all of them, at most)."
    )
    raw_scores: bool = Field(False, description="Return logits instead of probabilities.")
    cache: bool = Field(
        True, description="false: compute afresh and store nothing (as Cache-Control: no-cache)."
    )
    long_input: LongInput = Field(
        "truncate",
        description="truncate (default: at the model's 512 tokens, reported in usage), chunk (windows "
        "aggregated by the model's trained aggregator, else averaged), or an object for details.",
    )
    return_windows: bool = Field(False, description="With chunk: every window's scores and weight too.")


class NerBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: Inputs = Field(examples=["Angela Merkel met Emmanuel Macron in Paris."])
    model: str | None = Field(None, description="A token-classification model; default: the first.")
    aggregation_strategy: Literal["none", "simple", "first", "average", "max"] = Field(
        "simple", description="As in the Hugging Face token-classification pipeline."
    )
    cache: bool = Field(
        True, description="false: compute afresh and store nothing (as Cache-Control: no-cache)."
    )
    long_input: LongInput = Field(
        "chunk",
        description="chunk (default): overlapping windows; a token's label comes from the window where it "
        "sits farthest from an edge, entities are merged across borders. Or truncate, or an object.",
    )


class SummarizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: Text = Field(description="One document.", examples=["The first sentence. The second one."])
    model: str | None = Field(None, description="A summarization model; default: the first.")
    sentences: int | None = Field(3, ge=1, le=1000, description="How many sentences (null: use ratio).")
    ratio: float | None = Field(
        None, gt=0, le=1, description="Share of the sentences, when sentences is null."
    )
    max_chars: int | None = Field(None, ge=1, description="The summary's total length at most.")
    diversity: float = Field(
        0.8,
        ge=0,
        le=1,
        description="Skip a sentence whose word overlap (Jaccard) with a chosen one is above this.",
    )
    keep_order: bool = Field(True, description="Sentences in document order (else best first).")
    window: int | None = Field(None, ge=8, le=512, description="Tokens per window (as in long_input).")
    stride: int | None = Field(None, ge=1, description="Text tokens between window starts.")
    stream: bool = Field(False, description="Server-Sent Events (as Accept: text/event-stream).")
    cache: bool = Field(
        True, description="false: compute afresh and store nothing (as Cache-Control: no-cache)."
    )


class PredictBody(BaseModel):
    """text-embeddings-inference's /predict request (pairs of texts are not supported)."""

    inputs: Inputs
    raw_scores: bool = False
    truncate: bool = False
    truncation_direction: Literal["Right", "right"] = "Right"


class EmbedBody(BaseModel):
    """text-embeddings-inference's /embed request."""

    inputs: Inputs
    normalize: bool = True
    truncate: bool = False
    truncation_direction: Literal["Right", "right"] = "Right"


class Usage(BaseModel):
    tokens: int = Field(description="Tokens the model saw, special tokens included (every window's).")
    truncated_tokens: int = Field(description="Tokens dropped by truncation.")
    windows: int = Field(1, description="Encoder windows the input was read in.")


class LabelScore(BaseModel):
    label: str
    score: float


class WindowScores(BaseModel):
    start: int = Field(description="Character span of the window in the input.")
    end: int
    weight: float = Field(description="The window's weight in the aggregate.")
    labels: list[LabelScore]


class ClassifyResult(BaseModel):
    labels: list[LabelScore]
    usage: Usage
    windows: list[WindowScores] | None = Field(None, description="With return_windows.")


class ClassifyResponse(BaseModel):
    model: str
    results: list[ClassifyResult]


class EntityOut(BaseModel):
    entity_group: str | None = Field(None, description="Entity type (aggregated strategies).")
    entity: str | None = Field(None, description="Token tag, e.g. B-PER (strategy 'none').")
    index: int | None = Field(None, description="Token index (strategy 'none').")
    score: float
    word: str = Field(description="text[start:end]")
    start: int = Field(description="Character offset into the input.")
    end: int


class NerResult(BaseModel):
    entities: list[EntityOut]
    usage: Usage


class NerResponse(BaseModel):
    model: str
    results: list[NerResult]


class SummarySentence(BaseModel):
    index: int = Field(description="Position among the document's sentences.")
    text: str = Field(description="inputs[start:end]")
    start: int
    end: int
    score: float = Field(description="Probability that the sentence belongs in a summary.")


class SummarizeResponse(BaseModel):
    model: str
    sentences: list[SummarySentence]
    total_sentences: int
    usage: Usage


class ModelInfo(BaseModel):
    id: str
    task: str
    labels: list[str]
    description: str
    bundle: str
    version: str
    max_length: int
    precision: str


class ModelList(BaseModel):
    data: list[ModelInfo]


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail
