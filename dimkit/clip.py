"""CLIP through open_clip (notebook ``02_expert_cues``): resolve a ``--clip`` spec, load the model, and
encode texts and images in batches as DIM does (the released ``nel_model/prepare_*.py``): raw, not
L2-normalised, projected embeddings of OpenAI's ViT-B/32 by default, texts truncated to 77 tokens.

Only pretrained weights give numbers comparable to the paper; :attr:`ClipSpec.weights_real` says which
is which, and every output built on these features carries it.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import paths
from .errors import ConfigError, DimkitError

DEFAULT_CLIP = "ViT-B-32:openai"
#: Where the sample-trained CLIP ships (shipped in the package; regenerate with ``python -m dimkit_dev.clip_train``).
SAMPLE_CLIP_DIR = paths.sample_clip_dir()
SAMPLE_CLIP_NAMES = ("sample", "sample-clip", "dimkit-sample-clip")
#: Seed of ``ARCH:random`` weights, so random features are the same on every run and machine.
RANDOM_SEED = 0

#: Small open_clip architectures dimkit ships as open_clip config files in ``dimkit/model_configs``:
#: ``dimkit-tiny`` for tests (fast on CPU), ``dimkit-tiny-512`` (as fast, with ViT-B/32's 512-d output, so
#: a rehearsal's stores and matrices have their real size) and ``dimkit-sample`` for the CLIP trained on
#: the sample.
#: The text tower keeps CLIP's BPE vocabulary (49408 tokens) so the stock tokenizer works; its width
#: stays small because that embedding table dominates the shipped file size.
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
CONFIGS: dict[str, dict] = {p.stem: json.loads(p.read_text()) for p in sorted(MODEL_CONFIG_DIR.glob("*.json"))}

_REGISTER_LOCK = threading.Lock()


def register_dimkit_configs() -> None:
    """Make dimkit's small architectures known to open_clip (its public config-folder path; no temp files)."""
    import open_clip

    with _REGISTER_LOCK:
        if not set(CONFIGS) <= set(open_clip.list_models()):
            open_clip.add_model_config(MODEL_CONFIG_DIR)


@dataclass(frozen=True)
class ClipSpec:
    """A resolved ``--clip`` value: what to build, what to load, and the model id features are keyed by."""

    spec: str
    arch: str                      # open_clip model name, or "local-dir:<folder>" / "hf-hub:<repo>"
    weights: str | None            # pretrained tag, checkpoint path, or None (random / schema-loaded)
    model_id: str
    weights_real: bool
    quick_gelu: bool = False
    seed: int | None = None        # set for random weights
    note: str = ""


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    """SHA-256 of a weights file, hashed once per process while its size and mtime stay the same."""
    from .images import sha256_file

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = sha256_file(path)
    return _FILE_HASHES[key]


def _known_arch(name: str) -> bool:
    if name in CONFIGS:  # dimkit's own: no need to import open_clip (seconds) to know them
        return True
    import open_clip

    register_dimkit_configs()
    return name in open_clip.list_models()


def _local_dir_spec(text: str, folder: Path) -> ClipSpec:
    cfg_path = folder / "open_clip_config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"CLIP folder {folder} has no open_clip_config.json (expected open_clip's "
                          "local-folder layout: open_clip_config.json + open_clip_model.safetensors)")
    cfg = json.loads(cfg_path.read_text())
    marker = cfg.get("dimkit") or {}
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pth"))
    if not weights:
        raise ConfigError(f"CLIP folder {folder} has a config but no weights file (*.safetensors, *.bin, *.pth)")
    digest = hashlib.sha256(cfg_path.read_bytes() + b"".join(
        _file_sha256(w).encode() for w in weights)).hexdigest()
    if marker.get("model_id"):
        # The content hash follows the name, so retrained weights never reuse stored features.
        model_id = f"{marker['model_id']}:{digest[:8]}"
    else:
        model_id = f"local-dir:{folder.name}@{digest[:12]}"
    return ClipSpec(arch=f"local-dir:{folder.resolve()}", spec=text, weights=None, model_id=model_id,
                    weights_real=bool(marker.get("weights_real", True)), note=str(marker.get("note", "")))


def parse_clip_spec(text: str = "default") -> ClipSpec:
    """Resolve a ``--clip`` value without loading anything heavy.

    ``default`` = ``ViT-B-32:openai``, the weights DIM used (QuickGELU, as OpenAI trained them);
    ``ARCH:TAG``, any open_clip architecture and pretrained tag; ``ARCH:random[@SEED]`` (``random``:
    ViT-B-32), random weights from a fixed seed; a checkpoint file (taken as OpenAI's ``ViT-B-32.pt``,
    the file DIM loads) or ``ARCH:/path/file``; a folder in open_clip's local layout
    (``open_clip_config.json`` + weights); ``hf-hub:org/repo``; ``sample``, the small CLIP trained on the
    bundled sample, shipped in the package.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"--clip must be a non-empty string, got {text!r}")
    text = text.strip()
    if text.lower() == "default":
        text = DEFAULT_CLIP
    key = text.lower()
    if key in SAMPLE_CLIP_NAMES:
        if not (SAMPLE_CLIP_DIR / "open_clip_config.json").is_file():
            raise DimkitError(f"the sample-trained CLIP is missing from {SAMPLE_CLIP_DIR}; regenerate it "
                              "with `python -m dimkit_dev.clip_train` (or use --clip ViT-B-32:random)")
        return _local_dir_spec(text, SAMPLE_CLIP_DIR)
    if key == "random":
        text = "ViT-B-32:random"
    if text.startswith("hf-hub:"):
        return ClipSpec(arch=text, spec=text, weights=None, model_id=text, weights_real=True)
    if text.startswith("local-dir:"):
        return _local_dir_spec(text, Path(text[len("local-dir:"):]).expanduser())
    arch, sep, rest = text.partition(":")
    if sep and _known_arch(arch):
        if rest.lower().startswith("random"):
            seed = RANDOM_SEED
            if "@" in rest:
                try:
                    seed = int(rest.split("@", 1)[1].removeprefix("seed"))
                except ValueError:
                    raise ConfigError(f"bad random seed in --clip {text!r}; use ARCH:random@SEED") from None
            model_id = f"{arch}:random" + ("" if seed == RANDOM_SEED else f"@seed{seed}")
            return ClipSpec(arch=arch, spec=text, weights=None, model_id=model_id, weights_real=False,
                            seed=seed, note="random weights")
        import open_clip  # only now: it takes seconds, and random weights need none of its tables

        if rest in open_clip.list_pretrained_tags_by_model(arch):
            pcfg = open_clip.get_pretrained_cfg(arch, rest) or {}
            return ClipSpec(arch=arch, spec=text, weights=rest, model_id=f"{arch}:{rest}", weights_real=True,
                            quick_gelu=bool(pcfg.get("quick_gelu", False)))
        path = Path(rest).expanduser()
        if path.is_file():
            return ClipSpec(arch=arch, spec=text, weights=str(path.resolve()),
                            model_id=f"{arch}:file-{_file_sha256(path)[:12]}", weights_real=True)
        raise ConfigError(
            f"--clip {text!r}: {rest!r} is neither a pretrained tag of {arch} "
            f"({', '.join(open_clip.list_pretrained_tags_by_model(arch)[:6]) or 'none'} ...), nor 'random', "
            "nor an existing checkpoint file")
    path = Path(text).expanduser()
    if path.is_dir():
        return _local_dir_spec(text, path)
    if path.is_file():
        # A bare checkpoint is taken to be OpenAI's ViT-B-32.pt, the file DIM loads (QuickGELU).
        return ClipSpec(arch="ViT-B-32", spec=text, weights=str(path.resolve()),
                        model_id=f"ViT-B-32:file-{_file_sha256(path)[:12]}", weights_real=True, quick_gelu=True)
    if path.suffix in (".pt", ".pth", ".bin", ".safetensors") or text.startswith(("/", "./", "../", "~")):
        raise ConfigError(f"--clip {text!r}: no such file or folder")
    if _known_arch(text):
        raise ConfigError(f"--clip {text!r} names an architecture but no weights: use '{text}:TAG' "
                          f"(e.g. '{text}:openai') or '{text}:random'")
    raise ConfigError(
        f"unknown --clip {text!r}: use 'default' (ViT-B-32:openai), 'ARCH:TAG', 'ARCH:random', 'sample', "
        "a checkpoint file, a folder with open_clip_config.json, or 'hf-hub:org/repo'")


def pretrained_missing_message(cs: ClipSpec, reason: str) -> str:
    """What to tell a user whose pretrained CLIP weights cannot be fetched (offline, no hub)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    return (
        f"cannot load the pretrained CLIP weights {cs.model_id} ({reason}). "
        + ("HF_HUB_OFFLINE is set and they are not in the local Hugging Face cache. " if offline else
           "The model hub may be unreachable from this machine. ")
        + "Supply them locally: run once where the hub is reachable (`python -c \"import open_clip; "
        f"open_clip.create_model_and_transforms('{cs.arch}', pretrained='{cs.weights}')\"` fills the "
        "cache), or pass a checkpoint file: `--clip /path/to/ViT-B-32.pt` (OpenAI's file, what DIM used), "
        f"`--clip {cs.arch}:/path/to/open_clip_pytorch_model.bin`, or a folder holding "
        "open_clip_config.json + weights (`--clip /path/to/folder`). Without pretrained weights: "
        "`--clip sample` (sample-trained CLIP) or `--clip ViT-B-32:random` -- numbers then are not "
        "comparable to the paper.")


def _check_cached_offline(cs: ClipSpec) -> None:
    """Fail in a second, with instructions, when offline and the tag's weights are not cached."""
    if os.environ.get("HF_HUB_OFFLINE", "0") in ("", "0", "false", "False"):
        return
    import open_clip

    pcfg = open_clip.get_pretrained_cfg(cs.arch, cs.weights) or {}
    if pcfg.get("file"):
        return
    hub = pcfg.get("hf_hub", "")
    if not hub:
        raise DimkitError(pretrained_missing_message(cs, "this tag downloads from a URL"))
    from huggingface_hub import try_to_load_from_cache

    repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
    names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    if not any(isinstance(try_to_load_from_cache(repo_id=repo, filename=name), str) for name in names):
        raise DimkitError(pretrained_missing_message(cs, f"{repo} is not in the local cache"))


@dataclass
class ClipModel:
    """A loaded open_clip model with its preprocessing and tokenizer; encodes in batches."""

    spec: ClipSpec
    model: object
    preprocess: object
    tokenizer: object
    device: str
    precision: str
    dim: int
    trim_text: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def model_id(self) -> str:
        """Id features are keyed and labelled by (e.g. ``ViT-B-32:openai``, ``dimkit-sample-clip@1``)."""
        return self.spec.model_id

    @property
    def weights_real(self) -> bool:
        """True only for pretrained weights (numbers comparable to the paper)."""
        return self.spec.weights_real

    def tokenize(self, texts: Sequence[str]):
        """CLIP BPE tokens ``[N, context]``, truncated like ``clip.tokenize(..., truncate=True)``."""
        return self.tokenizer(list(texts))

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Raw CLIP text embeddings ``[N, D]`` float32 (texts sorted by length inside for speed)."""
        import torch

        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        tokens = self.tokenize(texts)                                    # [N, 77]
        lengths = (tokens != 0).sum(dim=1)
        order = torch.argsort(lengths, stable=True)
        with self._lock, torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                idx = order[i:i + batch_size]
                batch = tokens[idx].to(self.device)
                feats = _encode_trimmed(self.model, batch) if self.trim_text else self.model.encode_text(batch)
                out[idx.numpy()] = feats.float().cpu().numpy()
        return out

    def preprocess_images(self, images: Sequence, workers: int = 0):
        """The model's eval transform over PIL images -> ``[N, 3, H, W]`` tensor (optionally threaded)."""
        import torch

        if workers > 1 and len(images) > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                tensors = list(pool.map(self.pixels, images))
        else:
            tensors = [self.pixels(im) for im in images]
        return torch.stack(tensors)

    def pixels(self, image):
        """The model's eval transform of one PIL image ``[3, H, W]``.

        CLIP's transform scales the shorter side to the input size, then keeps the centre square. A
        sliver (60000 x 1 pixels) would first become 13 million pixels wide: beyond an aspect ratio
        of :data:`MAX_ASPECT`, the image is first cut to its centre 2:1 part, which holds that square
        and a margin for the resampling filter, so memory stays bounded (the square kept is the same
        to within a fraction of a pixel; ordinary images are not touched).
        """
        return self.preprocess(_centre_for_crop(self.preprocess, image))

    def encode_pixels(self, pixels) -> np.ndarray:
        """Raw CLIP image embeddings of preprocessed pixels ``[N, 3, H, W]`` -> ``[N, D]`` float32."""
        import torch

        with self._lock, torch.inference_mode():
            feats = self.model.encode_image(pixels.to(self.device, dtype=self._pixel_dtype()))
        return feats.float().cpu().numpy()

    def _pixel_dtype(self):
        """The dtype the image tower takes: its first convolution's or linear layer's. In open_clip's
        fp16/bf16 precision those hold half-precision weights while embeddings such as
        ``positional_embedding`` stay float32, so the first parameter does not tell."""
        import torch

        for module in self.model.visual.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                return module.weight.dtype
        return next(self.model.visual.parameters()).dtype

    def encode_images(self, images: Sequence, batch_size: int = 64, workers: int = 0) -> np.ndarray:
        """Raw CLIP image embeddings ``[N, D]`` float32 of RGB PIL images."""
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            out[i:i + len(chunk)] = self.encode_pixels(self.preprocess_images(chunk, workers))
        return out


#: Images longer than this many times their width (or the reverse) are cut before CLIP's transform.
MAX_ASPECT = 16


def _centre_for_crop(transform, image):
    """``image``, or its centre 2:1 part when it is a sliver and ``transform`` is resize-shorter-side
    then centre-crop (open_clip's eval transform), so the crop sees the same pixels."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    if short == 0 or long <= MAX_ASPECT * short:
        return image
    ops = getattr(transform, "transforms", ())
    if len(ops) < 2 or type(ops[0]).__name__ != "Resize" or type(ops[1]).__name__ != "CenterCrop":
        return image
    size = ops[0].size
    if not (isinstance(size, int) or (isinstance(size, (list, tuple)) and len(size) == 1)):
        return image  # a resize to a fixed shape ("squash") never blows up
    keep = 2 * short + (long - 2 * short) % 2  # the same parity as the long side: the centres coincide
    if w > h:
        left = (w - keep) // 2
        return image.crop((left, 0, left + keep, h))
    top = (h - keep) // 2
    return image.crop((0, top, w, top + keep))


def _encode_trimmed(model, tokens):
    """``model.encode_text(tokens)``, with the batch cut to its longest row.

    Every row ends at its end-of-text token; CLIP's causal mask means the padding after it never
    changes earlier positions, so the cut gives the same pooled vector for a fraction of the 77-token
    cost (:func:`_probe_trim` checks it against ``encode_text`` at load).
    """
    import torch
    from open_clip.transformer import text_global_pool

    length = max(int((tokens != 0).sum(dim=1).max().item()), 1)
    tokens = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast)                      # [B, L, W]
    x = x + model.positional_embedding[:length].to(cast)
    mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
    x = model.ln_final(model.transformer(x, attn_mask=mask))
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))  # [B, W]
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj   # [B, D]
    return x


def _probe_trim(model, tokenizer, device: str) -> bool:
    """Whether trimmed text encoding reproduces ``encode_text`` for this model (else keep 77 tokens)."""
    import torch

    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask",
              "text_pool_type", "text_projection")
    if not all(hasattr(model, a) for a in needed) or getattr(model, "text_pool_type", None) != "argmax":
        return False
    # A short and a longer row in one batch: the short one then carries padding inside the cut.
    probe = ["a", "Barack Obama [SEP] Obama met Merkel in Berlin ."]
    try:
        with torch.inference_mode():
            tokens = tokenizer(probe).to(device)
            full = model.encode_text(tokens).float()
            trimmed = _encode_trimmed(model, tokens).float()
    except Exception:  # an architecture we do not know: fall back to the library's own path
        return False
    scale = full.abs().max().clamp_min(1e-6)
    return bool(((full - trimmed).abs().max() / scale) < 1e-3)


_CACHE: dict[tuple, ClipModel] = {}
_CACHE_LOCK = threading.Lock()


def load_clip(clip: str | ClipSpec = "default", *, device: str = "auto", precision: str | None = None) -> ClipModel:
    """Build or load a CLIP (see :func:`parse_clip_spec`); fp16 on GPU as the released code, fp32 on CPU.

    The last model loaded is kept in memory, so a notebook running cues then features loads once.
    """
    from .env import pick_device

    cs = clip if isinstance(clip, ClipSpec) else parse_clip_spec(clip)
    device = pick_device(device)
    if precision is None:
        precision = "fp16" if device.startswith("cuda") else "fp32"
    key = (cs, device, precision)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    import open_clip
    import torch

    register_dimkit_configs()
    tagged = cs.weights is not None and not Path(cs.weights).is_file()  # a pretrained tag open_clip fetches
    try:
        if tagged:
            _check_cached_offline(cs)
        # Weights are built from a private RNG stream: random ones are the same on every run, and the
        # caller's global torch seed is left as it was.
        with torch.random.fork_rng(devices=[]):
            if cs.seed is not None:
                torch.manual_seed(cs.seed)
            model, _, preprocess = open_clip.create_model_and_transforms(
                cs.arch, pretrained=cs.weights, precision=precision, device=device, force_quick_gelu=cs.quick_gelu)
    except DimkitError:
        raise
    except (RuntimeError, OSError, ValueError, EOFError, KeyError, pickle.UnpicklingError,
            zipfile.BadZipFile) as exc:  # what torch.load and open_clip raise for a missing or damaged file
        first = (str(exc).splitlines() or [""])[0][:300]
        if tagged:
            raise DimkitError(pretrained_missing_message(cs, first)) from exc
        if cs.weights is not None:
            raise DimkitError(f"cannot load CLIP {cs.spec!r}: the checkpoint {cs.weights} is damaged or is not "
                              f"{cs.arch} weights ({type(exc).__name__}: {first})") from exc
        raise DimkitError(f"cannot load CLIP {cs.spec!r}: {type(exc).__name__}: {first}") from exc
    model.eval()
    tokenizer = open_clip.get_tokenizer(cs.arch)
    with torch.inference_mode():
        dim = int(model.encode_text(tokenizer(["a"]).to(device)).shape[-1])
    trim = _probe_trim(model, tokenizer, device)
    cm = ClipModel(model=model, spec=cs, preprocess=preprocess, tokenizer=tokenizer, device=device,
                   precision=precision, dim=dim, trim_text=trim)
    with _CACHE_LOCK:
        _CACHE.clear()
        _CACHE[key] = cm
    return cm


def clear_cache() -> None:
    """Forget the model kept by :func:`load_clip` (frees its memory)."""
    with _CACHE_LOCK:
        _CACHE.clear()
