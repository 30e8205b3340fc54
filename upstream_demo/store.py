"""The in-memory model registry: the demo backend's only state besides the identity provider."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Status = Literal["stopped", "starting", "running", "stopping"]

# The simulator's cycle: each status moves on to the next one.
NEXT_STATUS: dict[str, Status] = {
    "stopped": "starting",
    "starting": "running",
    "running": "stopping",
    "stopping": "stopped",
}

MODEL_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_MODEL_ID_RE = re.compile(MODEL_ID_PATTERN)


def utc_now_iso() -> str:
    """The current time as an RFC 3339 UTC timestamp with a `Z` suffix."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def slugify(name: str) -> str:
    """A model id derived from a display name (`Llama 3 8B` -> `llama-3-8b`)."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")
    return slug[:64] or "model"


def is_model_id(value: str) -> bool:
    return bool(_MODEL_ID_RE.match(value))


class ModelCreate(BaseModel):
    """Body of `POST /api/models`; unknown fields are ignored, `status` is not client-settable."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    name: str = Field(min_length=1, max_length=100)
    id: str | None = Field(default=None, pattern=MODEL_ID_PATTERN)
    description: str = Field(default="", max_length=1000)
    framework: str = Field(default="pytorch", min_length=1, max_length=40)
    version: str = Field(default="1.0.0", min_length=1, max_length=40)
    replicas: int = Field(default=1, ge=0, le=64)


class ModelReplace(BaseModel):
    """Body of `PUT /api/models/{id}`: every mutable field, defaults filled in."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    name: str = Field(min_length=1, max_length=100)
    description: str = Field(default="", max_length=1000)
    framework: str = Field(default="pytorch", min_length=1, max_length=40)
    version: str = Field(default="1.0.0", min_length=1, max_length=40)
    replicas: int = Field(default=1, ge=0, le=64)


class ModelPatch(BaseModel):
    """Body of `PATCH /api/models/{id}`: only the fields given change."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    name: str | None = Field(default=None, min_length=1, max_length=100)
    description: str | None = Field(default=None, max_length=1000)
    framework: str | None = Field(default=None, min_length=1, max_length=40)
    version: str | None = Field(default=None, min_length=1, max_length=40)
    replicas: int | None = Field(default=None, ge=0, le=64)


@dataclass(frozen=True, slots=True)
class Model:
    """One served model as the API shows it."""

    id: str
    name: str
    description: str
    framework: str
    version: str
    replicas: int
    status: Status
    created_by: str | None
    created_at: str
    updated_at: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class ConflictError(Exception):
    """A model with the requested id already exists."""


SEED_MODELS: tuple[tuple[str, str, str, str, Status], ...] = (
    ("llama2", "Llama 2 7B Chat", "Meta's chat-tuned Llama 2, 7B.", "pytorch", "running"),
    ("mistral-7b", "Mistral 7B Instruct", "Mistral AI's instruction model.", "vllm", "stopped"),
    ("phi-3", "Phi-3 Mini", "Microsoft's small language model, 3.8B.", "onnx", "stopped"),
)


class ModelStore:
    """Models kept in insertion order; values are immutable and replaced on change."""

    def __init__(self, *, seed: bool = True, now: Callable[[], str] = utc_now_iso) -> None:
        self._now = now
        self._models: dict[str, Model] = {}
        if seed:
            for model_id, name, description, framework, status in SEED_MODELS:
                stamp = self._now()
                self._models[model_id] = Model(
                    id=model_id,
                    name=name,
                    description=description,
                    framework=framework,
                    version="1.0.0",
                    replicas=1,
                    status=status,
                    created_by="system",
                    created_at=stamp,
                    updated_at=stamp,
                )

    def __len__(self) -> int:
        return len(self._models)

    def ids(self) -> list[str]:
        return list(self._models)

    def list(self, offset: int = 0, limit: int | None = None) -> list[Model]:
        models = list(self._models.values())
        end = None if limit is None else offset + limit
        return models[offset:end]

    def get(self, model_id: str) -> Model | None:
        return self._models.get(model_id)

    def create(self, body: ModelCreate, created_by: str | None) -> Model:
        if body.id is not None:
            if body.id in self._models:
                raise ConflictError(body.id)
            model_id = body.id
        else:
            model_id = base = slugify(body.name)
            suffix = 2
            while model_id in self._models:
                model_id = f"{base[:60]}-{suffix}"
                suffix += 1
        stamp = self._now()
        model = Model(
            id=model_id,
            name=body.name,
            description=body.description,
            framework=body.framework,
            version=body.version,
            replicas=body.replicas,
            status="stopped",
            created_by=created_by,
            created_at=stamp,
            updated_at=stamp,
        )
        self._models[model_id] = model
        return model

    def update(self, model_id: str, changes: dict[str, Any]) -> Model | None:
        current = self._models.get(model_id)
        if current is None:
            return None
        updated = replace(current, **changes, updated_at=self._now())
        self._models[model_id] = updated
        return updated

    def set_status(self, model_id: str, status: Status) -> Model | None:
        return self.update(model_id, {"status": status})

    def delete(self, model_id: str) -> Model | None:
        return self._models.pop(model_id, None)
