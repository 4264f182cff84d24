"""Wire schemas of the HTTP API (requests validated by pydantic; responses documented)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# A text with something in it: empty and blank texts are refused by the schema itself.
Text = Annotated[str, StringConstraints(min_length=1, pattern=r"\S")]
Inputs = Text | Annotated[list[Text], Field(min_length=1)]


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
    long_input: Literal["truncate"] = Field(
        "truncate", description="Inputs longer than the model's maximum are truncated (reported in usage)."
    )


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
    long_input: Literal["truncate"] = "truncate"


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
    tokens: int = Field(description="Tokens the model saw, special tokens included.")
    truncated_tokens: int = Field(description="Tokens dropped by truncation.")


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyResult(BaseModel):
    labels: list[LabelScore]
    usage: Usage


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
