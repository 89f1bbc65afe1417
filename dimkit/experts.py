"""Image "experts" that say who or what is in a mention image: the cue DIM feeds its model
(the released ``nel_model/prepare_wikipedia.py::convert_caption``).

One interface, several implementations, picked by :func:`make_expert` from a short spec:

- ``blip2`` / ``blip2:<hub id or folder>``: transformers' ``Blip2ForConditionalGeneration`` with DIM's
  exact prompt ``"Question:  Who are the characters in the picture? Answer: "`` and 20 new tokens
  (default checkpoint ``Salesforce/blip2-opt-2.7b``, what DIM used);
- ``hf:<hub id or folder>``: any transformers image-text-to-text checkpoint (BLIP, GIT, LLaVA, Qwen-VL
  ...; a chat template, when the processor has one, wraps the question); ``vqa:<...>`` for
  visual-question-answering checkpoints (``BlipForQuestionAnswering``);
- ``openai:<model>``: an OpenAI-compatible vision chat endpoint (hosted, or a local VLM server via
  ``OPENAI_BASE_URL``); the key comes from ``OPENAI_API_KEY`` only;
- ``replay:<file.json>``: cues written elsewhere (``{"expert", "prompt", "cues": {image path: text}}``);
  ``sample-oracle`` is the bundled sample's file -- **synthetic oracle cues**, not BLIP-2;
- ``replay:<model id>``: only what the cue store already holds for that expert (no model at all);
- ``none``: no cues (what the released code does for WikiDiverse).

Each expert has a ``model_id`` and a ``prompt_version``; with the image's content hash they make the
store key of every cue (:mod:`dimkit.cues`), so a changed prompt never reuses an old answer.
Models load lazily: a rerun whose cues are all stored never loads BLIP-2.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from . import paths
from .errors import ConfigError, DimkitError, check_positive, option

#: DIM's BLIP-2 prompt, verbatim (two spaces after "Question:"), from ``prepare_wikipedia.py::convert_caption``.
RELEASED_PROMPT = "Question:  Who are the characters in the picture? Answer: "
#: The same question without BLIP-2's "Question: ... Answer:" frame, for chat models.
RELEASED_QUESTION = "Who are the characters in the picture?"
RELEASED_MAX_NEW_TOKENS = 20
DEFAULT_BLIP2 = "Salesforce/blip2-opt-2.7b"
#: Images per generate() call for transformers experts. Greedy decoding of a batch of one is
#: dominated by per-step overhead; 32 BLIP-2 OPT-2.7B rows in fp16 need well under 2 GB beyond the
#: weights, and a batch that fails (out of memory included) is split in halves and retried.
DEFAULT_HF_BATCH = 32
SAMPLE_ORACLE = "sample-oracle"


@dataclass
class CueItem:
    """One distinct usable image to describe."""

    image_sha256: str
    path: Path
    rel: str
    image: Any = None  # RGB PIL image, filled in by the caller for experts that need pixels


@dataclass
class Answer:
    """An expert's answer for one image: the text, or None and why not."""

    text: str | None
    reason: str | None = None
    detail: str | None = None


def prompt_version(prompt: str, max_new_tokens: int, extra: dict | None = None) -> str:
    """Short stable id of a prompt + generation settings (``released@1`` for DIM's own)."""
    if prompt == RELEASED_PROMPT and max_new_tokens == RELEASED_MAX_NEW_TOKENS and not extra:
        return "released@1"
    blob = json.dumps({"prompt": prompt, "max_new_tokens": max_new_tokens, **(extra or {})}, sort_keys=True)
    return "p-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


class Expert:
    """Base class: ``describe(items) -> answers`` for a batch of distinct images."""

    model_id: str = "expert"
    prompt: str | None = None
    version: str = "v1"
    needs_pixels: bool = True
    synthetic: bool = False
    batch_size: int = 8
    note: str = ""
    #: Set when the expert cannot answer any image (a refused key, an unknown model, a spent quota): the
    #: caller stores the answers it has, then raises it. Images not asked get the reason ``NOT_ASKED``.
    fatal: DimkitError | None = None

    def describe(self, items: Sequence[CueItem]) -> list[Answer]:
        """Answers for ``items`` (same order); never raises for one bad image."""
        raise NotImplementedError

    def close(self) -> None:
        """Free the model, if one was loaded."""


# ---------------------------------------------------------------------------------------------
# transformers (BLIP-2 and any image-text-to-text / VQA checkpoint)


def _local_model_id(folder: Path) -> str:
    """Id of a local checkpoint folder: its name plus a hash of its configs and weight file sizes."""
    h = hashlib.sha256()
    for name in ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json"):
        p = folder / name
        if p.is_file():
            h.update(name.encode() + p.read_bytes())
    for w in sorted(list(folder.glob("*.safetensors")) + list(folder.glob("*.bin"))):
        h.update(f"{w.name}:{w.stat().st_size}".encode())
    return f"{folder.name}@{h.hexdigest()[:12]}"


class TransformersExpert(Expert):
    """BLIP-2 (DIM's expert) or any transformers image-text-to-text / VQA model, batched."""

    def __init__(self, model: str = DEFAULT_BLIP2, *, prompt: str | None = None, task: str = "auto",
                 device: str = "auto", dtype: str | None = None, batch_size: int = DEFAULT_HF_BATCH,
                 max_new_tokens: int = RELEASED_MAX_NEW_TOKENS, model_id: str | None = None,
                 trust_remote_code: bool = False):
        if task not in ("auto", "caption", "vqa"):
            raise ConfigError(f"task must be auto, caption or vqa, got {task!r}")
        self.source = model
        local = Path(model).expanduser()
        self.local = local.is_dir()
        self.model_id = model_id or (_local_model_id(local) if self.local else model)
        self.task = task
        self.device_pref = device
        self.dtype_name = dtype
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.trust_remote_code = trust_remote_code
        self._prompt = prompt
        self._model = None
        self._processor = None
        self._chat = False
        # Version from the prompt as given; a chat template (known only once loaded) is part of the model.
        self.prompt = prompt if prompt is not None else RELEASED_PROMPT
        self.version = prompt_version(self.prompt, max_new_tokens, {"task": task} if task == "vqa" else None)

    @classmethod
    def from_model(cls, model, processor, *, model_id: str, prompt: str = RELEASED_PROMPT,
                   max_new_tokens: int = RELEASED_MAX_NEW_TOKENS, batch_size: int = DEFAULT_HF_BATCH,
                   device: str = "cpu") -> "TransformersExpert":
        """Wrap an already built model + processor (tests, notebooks experimenting in memory)."""
        ex = cls.__new__(cls)
        ex.source, ex.local, ex.model_id, ex.task = model_id, False, model_id, "auto"
        ex.device_pref, ex.dtype_name, ex.batch_size = device, None, batch_size
        ex.max_new_tokens, ex.trust_remote_code, ex._prompt = max_new_tokens, False, prompt
        ex.prompt, ex.version = prompt, prompt_version(prompt, max_new_tokens)
        ex._model, ex._processor = model.eval(), processor
        ex._chat = False
        ex._device = device
        ex._dtype = next(model.parameters()).dtype
        ex._setup_padding()
        return ex

    def _setup_padding(self) -> None:
        tok = getattr(self._processor, "tokenizer", None)
        # Decoder-only language models generate after the prompt: pad on the left so every row's
        # prompt ends at the same position.
        if tok is not None:
            tok.padding_side = "left"

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch
        import transformers
        from .env import pick_device

        device = pick_device(self.device_pref)
        if self.dtype_name:
            dtype = getattr(torch, self.dtype_name)
        else:
            # Half precision on GPU as the released code; fp32 elsewhere (CPU fp16 is slow or absent).
            dtype = torch.float16 if device.startswith("cuda") else torch.float32
        auto = (transformers.AutoModelForVisualQuestionAnswering if self.task == "vqa"
                else transformers.AutoModelForImageTextToText)
        try:
            processor = transformers.AutoProcessor.from_pretrained(
                self.source, trust_remote_code=self.trust_remote_code)
            model = auto.from_pretrained(self.source, dtype=dtype, trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError, EnvironmentError) as exc:
            hint = ("" if self.local else
                    f" If this machine is offline, download the checkpoint where the hub is reachable "
                    f"(`hf download {self.source} --local-dir /path/to/folder`) and pass the folder: "
                    f"--expert blip2:/path/to/folder (or hf:/path/to/folder). To run without a model, "
                    f"replay stored cues: --expert replay:<file.json or model id>.")
            raise DimkitError(f"cannot load the expert model {self.source!r}: {str(exc).splitlines()[0][:300]}.{hint}") from exc
        model.to(device).eval()
        self._model, self._processor = model, processor
        self._device, self._dtype = device, dtype
        self._chat = bool(getattr(processor, "chat_template", None)) and self._prompt is None
        self._setup_padding()

    def _text_for(self, n: int) -> list[str]:
        if self._chat:
            # Chat models get the bare question inside their own template (BLIP-2's "Question: ...
            # Answer:" frame would be a foreign format to them).
            messages = [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": RELEASED_QUESTION}]}]
            text = self._processor.apply_chat_template(messages, add_generation_prompt=True)
            return [text] * n
        return [self.prompt] * n

    def _generate(self, images: list) -> list[str]:
        import torch

        proc = self._processor
        inputs = proc(images=images, text=self._text_for(len(images)), return_tensors="pt", padding=True)
        inputs = {k: (v.to(self._device, dtype=self._dtype) if torch.is_floating_point(v) else v.to(self._device))
                  for k, v in inputs.items()}
        with torch.inference_mode():
            out = self._model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        ids = inputs.get("input_ids")
        # Newer transformers echo the prompt before the generated tokens; older BLIP-2 did not.
        if ids is not None and out.shape[1] > ids.shape[1] and torch.equal(out[:, :ids.shape[1]].cpu(), ids.cpu()):
            out = out[:, ids.shape[1]:]
        return [t.strip() for t in proc.batch_decode(out, skip_special_tokens=True)]

    def describe(self, items: Sequence[CueItem]) -> list[Answer]:
        """Generate cues for a batch. A failing batch (a broken image, out of memory) is split in
        halves and retried, down to single images, so one bad image costs ~log2(batch) extra calls
        and only that image is recorded as failed."""
        self._load()
        images = [it.image for it in items]
        try:
            texts = self._generate(images)
        except Exception as exc:  # isolate the image at fault rather than lose the batch
            if len(items) == 1:
                return [Answer(None, "model_error", f"{type(exc).__name__}: {exc}"[:500])]
            self._free_cached_memory()
            half = len(items) // 2
            return self.describe(items[:half]) + self.describe(items[half:])
        return [Answer(t) if t else Answer(None, "empty_answer", "the model generated no text") for t in texts]

    def _free_cached_memory(self) -> None:
        """After a failure (often CUDA out of memory) give the allocator's cached blocks back."""
        import torch

        if str(getattr(self, "_device", "cpu")).startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def close(self) -> None:
        """Drop the model (and its GPU memory)."""
        self._model = None
        self._processor = None


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible vision chat endpoint


#: llm.classify's failure categories -> the cue store's (others: api_error, with the HTTP status in the detail).
#: The reason of an image not asked because the expert stopped (:attr:`Expert.fatal`); never stored.
NOT_ASKED = "not_asked"
_CUE_REASON = {"rate_limited": "rate_limited", "timeout": "timeout", "connection": "connection_error",
               "malformed": "bad_response", "empty": "empty_answer"}


class OpenAIExpert(Expert):
    """A vision chat model behind an OpenAI-compatible API (key from ``OPENAI_API_KEY`` only).

    Requests go through :class:`dimkit.llm.ChatClient`, as :mod:`dimkit.augment`'s do: the openai
    client retries 429s, 5xx, timeouts and dropped connections (``max_retries``), and a malformed or
    empty answer is asked again up to ``max_attempts`` times.
    """

    def __init__(self, model: str, *, base_url: str | None = None, prompt: str | None = None,
                 max_new_tokens: int = RELEASED_MAX_NEW_TOKENS, workers: int = 4, timeout: float = 60.0,
                 max_retries: int = 3, max_attempts: int = 3, max_side: int = 1024, batch_size: int = 16):
        from .llm import Endpoint

        self.model = model
        # Where requests go, from the argument or OPENAI_BASE_URL; the key only from OPENAI_API_KEY.
        self._endpoint = Endpoint.resolve(base_url, api_key=os.environ.get("OPENAI_API_KEY"))
        self.base_url = self._endpoint.public_url
        host = self.base_url.split("://", 1)[-1].split("/", 1)[0]
        self.model_id = f"openai-chat:{model}@{host}"
        self.prompt = prompt if prompt is not None else RELEASED_QUESTION
        self.max_new_tokens = max_new_tokens
        self.version = prompt_version(self.prompt, max_new_tokens, {"api": "chat", "max_side": max_side})
        self.workers = workers
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_attempts = max_attempts
        self.max_side = max_side
        self.batch_size = batch_size
        self._client = None

    def _client_or_fail(self):
        if self._client is None:
            from .llm import ChatClient, Endpoint

            endpoint = self._endpoint
            if not endpoint.api_key:
                if "api.openai.com" in self.base_url:
                    raise DimkitError("OPENAI_API_KEY is not set: export it in the environment (never pass "
                                      "it as an argument or notebook parameter), or point OPENAI_BASE_URL "
                                      "at a local server")
                # local servers ignore the key; the client requires one
                endpoint = Endpoint(endpoint.base_url, "unused-by-local-server")
            self._client = ChatClient(endpoint, timeout_s=self.timeout, max_retries=self.max_retries,
                                      max_attempts=self.max_attempts)
        return self._client

    def _data_url(self, image) -> str:
        img = image
        if max(img.size) > self.max_side:
            img = img.copy()
            img.thumbnail((self.max_side, self.max_side))
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=False)
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def _ask(self, item: CueItem) -> Answer:
        from .llm import LLMError

        if self.fatal is not None:  # another worker's request was refused: the rest are not sent
            return Answer(None, NOT_ASKED, "the endpoint refused an earlier request")
        messages = [{"role": "user", "content": [
            {"type": "text", "text": self.prompt},
            {"type": "image_url", "image_url": {"url": self._data_url(item.image)}}]}]
        try:
            answer = self._client_or_fail().complete(self.model, messages, max_tokens=self.max_new_tokens,
                                                     temperature=0)
        except LLMError as err:  # the key is scrubbed from the detail
            detail = f"HTTP {err.status}: {err.detail}" if err.status else err.detail
            if err.fatal:  # a refused key, an unknown model, a spent quota: no other image will fare better
                self.fatal = DimkitError(
                    f"the expert endpoint {self.base_url} refused model {self.model!r} ({err.reason}): {detail}. "
                    "Nothing more is asked; the cues answered so far are stored")
                return Answer(None, NOT_ASKED, "the endpoint refused an earlier request")
            return Answer(None, _CUE_REASON.get(err.reason, "api_error"), detail)
        return Answer(answer.text)

    def describe(self, items: Sequence[CueItem]) -> list[Answer]:
        """Ask the endpoint about each image, ``workers`` requests at a time; after a refusal that no
        retry cures, the rest are not sent (:attr:`fatal`)."""
        self._client_or_fail()
        self.fatal = None
        if self.workers <= 1 or len(items) <= 1:
            return [self._ask(it) for it in items]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self._ask, items))


# ---------------------------------------------------------------------------------------------
# Replay


def _path_variants(rel: str) -> list[str]:
    """Ways one image may be named, most specific first: after ``ImgData/``, then every path suffix
    (``images/wikipedia/1.png``, ``wikipedia/1.png``, ``1.png``)."""
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    out = []
    if "ImgData" in parts:
        out.append(str(PurePosixPath(*parts[parts.index("ImgData") + 1:])))
    out.extend(str(PurePosixPath(*parts[i:])) for i in range(len(parts)))
    return list(dict.fromkeys(o for o in out if o and o != "."))


class ReplayFileExpert(Expert):
    """Cues read from a JSON file ``{"expert", "prompt", "note", "cues": {image path: text}}``."""

    needs_pixels = False

    def __init__(self, path: str | Path, *, synthetic: bool | None = None, batch_size: int = 512):
        self.path = Path(path)
        if not self.path.is_file():
            raise DimkitError(f"cue file not found: {self.path}")
        raw = self.path.read_bytes()
        try:
            data = json.loads(raw)
            cues = data["cues"]
            if not isinstance(cues, dict):
                raise TypeError("'cues' is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            from .errors import DataError
            raise DataError(f"not a cue file ({exc})", file=self.path, field="cues") from exc
        self.model_id = str(data.get("expert") or f"replay:{self.path.stem}")
        self.prompt = data.get("prompt")
        self.note = str(data.get("note") or "")
        # The file's content is the "prompt version": an edited file never replays stale cues.
        self.version = "file-" + hashlib.sha256(raw).hexdigest()[:12]
        self.synthetic = bool(synthetic) if synthetic is not None else (
            "synthetic" in self.note.lower() or self.model_id == SAMPLE_ORACLE)
        self.batch_size = batch_size
        self._lookup: dict[str, str] = {}
        # Exact keys first, then their shorter suffixes, so a longer (more specific) name always
        # wins over a bare file name shared by two folders.
        for key, text in cues.items():
            self._lookup[str(key)] = text
        for key, text in cues.items():
            for v in _path_variants(str(key)):
                self._lookup.setdefault(v, text)

    def describe(self, items: Sequence[CueItem]) -> list[Answer]:
        """Look each image up by path (after ``ImgData/``, as given, or file name)."""
        out = []
        for it in items:
            text = next((self._lookup[v] for v in _path_variants(it.rel) if v in self._lookup), None)
            if text is None:
                out.append(Answer(None, "not_in_replay", f"{it.rel} is not in {self.path.name}"))
            elif not str(text).strip():
                out.append(Answer(None, "empty_answer", "empty text in the cue file"))
            else:
                out.append(Answer(str(text).strip()))
        return out


class StoreReplayExpert(Expert):
    """Replays what the cue store holds for one expert; computes nothing (misses are reported)."""

    needs_pixels = False

    def __init__(self, model_id: str, version: str | None = None, *, store_path: str | Path | None = None):
        self.model_id = model_id
        if version is None:
            version = self._most_used_version(store_path)
        self.version = version
        self.batch_size = 4096
        self.note = "replayed from the cue store"

    def _most_used_version(self, store_path) -> str:
        from collections import Counter

        from .store import Store, default_store_path

        counts: Counter = Counter()
        with Store(store_path or default_store_path("cues")) as st:
            for rec in st.items("expert_cue"):
                if rec["model"] == self.model_id:
                    counts[rec["version"]] += 1
        if not counts:
            raise DimkitError(f"the cue store holds nothing for expert {self.model_id!r}; run that "
                              "expert first or replay a cue file (--expert replay:path.json)")
        return counts.most_common(1)[0][0]

    def describe(self, items: Sequence[CueItem]) -> list[Answer]:
        """Everything asked for here was missing from the store."""
        return [Answer(None, "not_in_store", f"no stored cue of {self.model_id} for this image") for _ in items]


class NoExpert(Expert):
    """No cues at all (the released code's WikiDiverse behaviour); cue features are zeros."""

    model_id = "none"
    needs_pixels = False


def sample_cue_file() -> Path:
    """The bundled sample's stored cues (``dimkit/data/sample/source/expert_cues.json``)."""
    return paths.sample_source_dir() / "expert_cues.json"


@dataclass
class ExpertOptions:
    """Options shared by the experts (each uses those that apply to it)."""

    prompt: str | None = None
    device: str = "auto"
    batch_size: int | None = None
    max_new_tokens: int = RELEASED_MAX_NEW_TOKENS
    base_url: str | None = None
    workers: int = 4
    extra: dict = field(default_factory=dict)


def make_expert(name: str | Expert, **options: Any) -> Expert:
    """Build an expert from a spec string (see the module docstring); an Expert passes through."""
    if isinstance(name, Expert):
        return name
    opts = ExpertOptions(**{k: v for k, v in options.items() if k in ExpertOptions.__dataclass_fields__})
    unknown = set(options) - set(ExpertOptions.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown expert option(s): {', '.join(sorted(unknown))}")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{option('expert', '--expert')} must be a non-empty string, got {name!r}")
    check_positive({"max_new_tokens": opts.max_new_tokens, "batch_size": opts.batch_size, "workers": opts.workers})
    name = name.strip()
    kind, _, rest = name.partition(":")
    kind = kind.lower()
    hf_kw = dict(prompt=opts.prompt, device=opts.device, max_new_tokens=opts.max_new_tokens,
                 **({"batch_size": opts.batch_size} if opts.batch_size else {}))
    if name.lower() in (SAMPLE_ORACLE, "oracle"):
        return ReplayFileExpert(sample_cue_file(), synthetic=True,
                                **({"batch_size": opts.batch_size} if opts.batch_size else {}))
    if name.lower() == "none":
        return NoExpert()
    if kind == "blip2":
        return TransformersExpert(rest or DEFAULT_BLIP2, **hf_kw)
    if kind == "hf" and rest:
        return TransformersExpert(rest, **hf_kw)
    if kind == "vqa" and rest:
        if opts.prompt is None:
            hf_kw["prompt"] = RELEASED_QUESTION
        return TransformersExpert(rest, task="vqa", **hf_kw)
    if kind == "openai" and rest:
        return OpenAIExpert(rest, base_url=opts.base_url, prompt=opts.prompt, max_new_tokens=opts.max_new_tokens,
                            workers=opts.workers, **({"batch_size": opts.batch_size} if opts.batch_size else {}))
    if kind == "replay" and rest:
        p = Path(rest).expanduser()
        if p.suffix == ".json" or p.is_file():
            return ReplayFileExpert(p)
        model_id, _, version = rest.partition("@@")
        return StoreReplayExpert(model_id, version or None)
    raise ConfigError(
        f"unknown {option('expert', '--expert')} {name!r}: use blip2[:ID_OR_FOLDER], hf:ID_OR_FOLDER, vqa:ID_OR_FOLDER, "
        "openai:MODEL, replay:FILE.json, replay:MODEL_ID, sample-oracle or none")
