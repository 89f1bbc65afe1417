"""Train the small CLIP that ships with the bundled sample (``dimkit/data/sample/clip/``).

Offline there are no pretrained CLIP weights, and random ones make every feature noise. So dimkit
trains a small CLIP (open_clip architecture ``dimkit-sample``: 64-px ViT, 64-d embeddings) on the
sample's **train split only**: each train mention image against the stored expert cue of that image,
the stored LLM answer of its gold entity and its "mention [SEP] sentence" text, with a contrastive
loss whose positives are every pair of the same entity (names are shared, entities are not). The
result is saved in open_clip's local-folder layout (``open_clip_config.json`` +
``open_clip_model.safetensors``, fp16) and loaded through the same path a user's own checkpoint
takes (``--clip sample``). Its features are labelled "sample-trained CLIP, not comparable to the
paper" everywhere.

Regenerate with ``python -m dimkit_dev.clip_train`` (seeded; identical on the same machine and thread
count, float rounding may differ elsewhere). ``--check`` trains to a temporary folder and reports
how far the result is from the shipped one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dimkit import paths
from dimkit.clip import CONFIGS, SAMPLE_CLIP_DIR, register_dimkit_configs
from dimkit.errors import DataError, DimkitError

ARCH = "dimkit-sample"
MODEL_NAME = "dimkit-sample-clip"
VERSION = 1
WEIGHTS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"
NOTE = ("small CLIP trained by dimkit on the synthetic sample's train split (64-px drawings, oracle cues "
        "and answers); not pretrained, not comparable to the paper")


@dataclass
class ClipTrainConfig:
    """How the sample CLIP is trained (defaults reproduce the shipped one)."""

    num_epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    seed: int = 114514
    threads: int = 2
    sentence_weight: float = 0.5
    source: Path = field(default_factory=paths.sample_source_dir)
    out: Path = SAMPLE_CLIP_DIR


@dataclass
class TrainedClip:
    """Where the trained CLIP went and how training went."""

    folder: Path
    model_id: str
    size_bytes: int
    losses: list[float]
    seconds: float
    pairs: int
    retrieval_at_1: float   # train-split: image -> gold entity answer among all answers (sanity check)


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read ({exc})", file=path) from exc


def training_pairs(source: Path) -> tuple[list[dict], dict[str, str]]:
    """Train-split records ``{image, cue, qid, sentence}`` with a usable image and a cue, and qid -> answer."""
    from dimkit.images import load_image

    source = Path(source)
    train = _load_json(source / "wikipedia" / "train.json")
    answers = _load_json(source / "llm_answers.json")["answers"]
    cues = _load_json(source / "expert_cues.json")["cues"]
    rows = []
    for key in sorted(train):
        rec = train[key]
        img_rel, qid = rec.get("imgPath"), rec.get("answer")
        if not img_rel or qid not in answers or img_rel not in cues:
            continue
        loaded = load_image(source / "ImgData" / img_rel)
        if loaded.image is None:
            continue
        rows.append({"image": loaded.image, "cue": cues[img_rel], "qid": qid,
                     "sentence": f"{rec['mentions']} [SEP] {rec['sentence']}"})
    if not rows:
        raise DimkitError(f"no usable training pairs in {source}")
    return rows, answers


def _multi_positive_loss(a, b, labels, scale):
    """Symmetric InfoNCE where every pair with the same entity label counts as a positive."""
    import torch
    import torch.nn.functional as F

    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    logits = scale * a @ b.T                                   # [B, B]
    pos = (labels[:, None] == labels[None, :]).float()
    target = pos / pos.sum(dim=1, keepdim=True)
    return 0.5 * (torch.sum(-target * F.log_softmax(logits, dim=1), dim=1).mean()
                  + torch.sum(-target * F.log_softmax(logits.T, dim=1), dim=1).mean())


def train_sample_clip(cfg: ClipTrainConfig | None = None, *, progress: bool = True) -> TrainedClip:
    """Train the sample CLIP and write it (atomically) to ``cfg.out``."""
    import open_clip
    import torch
    from tqdm.auto import tqdm

    from dimkit.clip import ClipModel, _encode_trimmed

    cfg = cfg or ClipTrainConfig()
    t0 = time.perf_counter()
    register_dimkit_configs()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    rows, answers = training_pairs(cfg.source)
    model, _, preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=None)
    tokenizer = open_clip.get_tokenizer(ARCH)
    cm = ClipModel(model=model, spec=None, preprocess=preprocess, tokenizer=tokenizer, device="cpu",  # type: ignore[arg-type]
                   precision="fp32", dim=CONFIGS[ARCH]["embed_dim"], trim_text=True)

    pixels = torch.stack([preprocess(r["image"]) for r in rows])          # [P, 3, 64, 64]
    qids = sorted({r["qid"] for r in rows})
    label_of = {q: i for i, q in enumerate(qids)}
    labels_all = torch.tensor([label_of[r["qid"]] for r in rows])
    cue_tok = tokenizer([r["cue"] for r in rows])
    ans_tok = tokenizer([answers[r["qid"]] for r in rows])
    sent_tok = tokenizer([r["sentence"] for r in rows])

    steps_per_epoch = (len(rows) + cfg.batch_size - 1) // cfg.batch_size
    total = cfg.num_epochs * steps_per_epoch
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in name or "logit_scale" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) * max(0.0, 1 - s / total))
    losses: list[float] = []
    model.train()
    bar_kw = {} if progress else {"disable": True}
    with tqdm(total=total, desc="training sample CLIP", unit="step", **bar_kw) as bar:
        for _epoch in range(cfg.num_epochs):
            order = rng.permutation(len(rows))
            epoch_loss = 0.0
            for s in range(steps_per_epoch):
                idx = torch.from_numpy(order[s * cfg.batch_size:(s + 1) * cfg.batch_size])
                labels = labels_all[idx]
                scale = model.logit_scale.exp().clamp(max=100)
                img = model.encode_image(pixels[idx])                     # [B, D]
                cue = _encode_trimmed(model, cue_tok[idx])                 # [B, D]
                ans = _encode_trimmed(model, ans_tok[idx])
                sent = _encode_trimmed(model, sent_tok[idx])
                loss = (_multi_positive_loss(img, ans, labels, scale)
                        + _multi_positive_loss(img, cue, labels, scale)
                        + _multi_positive_loss(cue, ans, labels, scale)
                        + cfg.sentence_weight * _multi_positive_loss(img, sent, labels, scale))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                epoch_loss += loss.item()
                bar.update(1)
            losses.append(round(epoch_loss / steps_per_epoch, 4))
            bar.set_postfix(loss=losses[-1])
    model.eval()

    # Sanity check on the train split: does each image retrieve its entity's answer?
    with torch.inference_mode():
        ans_q = sorted(answers)
        a = torch.nn.functional.normalize(torch.from_numpy(cm.encode_texts([answers[q] for q in ans_q])), dim=-1)
        v = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        pred = (v @ a.T).argmax(dim=1)
        gold = torch.tensor([ans_q.index(r["qid"]) for r in rows])
        r_at_1 = float((pred == gold).float().mean())

    used = torch.unique(torch.cat([cue_tok.flatten(), ans_tok.flatten(), sent_tok.flatten()]))
    folder = _save(model, cfg, used_tokens=used, rows_n=len(rows), losses=losses, r_at_1=r_at_1)
    from dimkit.clip import _local_dir_spec

    spec = _local_dir_spec(str(folder), folder)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return TrainedClip(folder=folder, model_id=spec.model_id, size_bytes=size, losses=losses,
                       seconds=round(time.perf_counter() - t0, 1), pairs=len(rows), retrieval_at_1=r_at_1)


def _save(model, cfg: ClipTrainConfig, *, used_tokens, rows_n: int, losses: list[float], r_at_1: float) -> Path:
    """Write config + fp16 weights into a staging folder, then move them into ``cfg.out``."""
    import torch
    from safetensors.torch import save_file

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    # Token rows the sample never uses keep their random init; zeroing them changes no sample
    # feature's meaning and lets git compress the committed file to a fraction of its size.
    emb = state["token_embedding.weight"]                           # [49408, W]
    unused = torch.ones(emb.shape[0], dtype=torch.bool)
    unused[used_tokens] = False
    emb[unused] = 0
    config = {
        "model_cfg": CONFIGS[ARCH],
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711],
                           "interpolation": "bicubic", "resize_mode": "shortest"},
        "dimkit": {"model_id": f"{MODEL_NAME}@{VERSION}", "weights_real": False, "note": NOTE,
                   "arch": ARCH, "train": {k: (str(v) if isinstance(v, Path) else v)
                                           for k, v in asdict(cfg).items() if k not in ("source", "out")},
                   "pairs": rows_n, "final_loss": losses[-1] if losses else None,
                   "train_retrieval_at_1": round(r_at_1, 4),
                   "regenerate": "python -m dimkit_dev.clip_train"},
    }
    stage = Path(tempfile.mkdtemp(prefix=".clip-staging-", dir=out.parent))
    try:
        save_file(state, str(stage / WEIGHTS_FILE), metadata={"format": "pt", "model": f"{MODEL_NAME}@{VERSION}"})
        (stage / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            os.chmod(stage / name, 0o644)  # committed files: readable by everyone
        out.mkdir(parents=True, exist_ok=True)
        # Config last: a folder whose weights changed but config did not would still load.
        os.replace(stage / WEIGHTS_FILE, out / WEIGHTS_FILE)
        os.replace(stage / CONFIG_FILE, out / CONFIG_FILE)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m dimkit_dev.clip_train [--out DIR] [--num-epochs N] [--check]``."""
    p = argparse.ArgumentParser(prog="python -m dimkit_dev.clip_train", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(SAMPLE_CLIP_DIR), help=f"output folder (default {SAMPLE_CLIP_DIR})")
    p.add_argument("--num-epochs", type=int, default=ClipTrainConfig.num_epochs)
    p.add_argument("--seed", type=int, default=ClipTrainConfig.seed)
    p.add_argument("--check", action="store_true",
                   help="train into a temporary folder and compare with the shipped weights")
    args = p.parse_args(argv)
    cfg = ClipTrainConfig(num_epochs=args.num_epochs, seed=args.seed, out=Path(args.out))
    if args.check:
        tmp = Path(tempfile.mkdtemp(prefix="dimkit-clip-check-"))
        cfg.out = tmp / "clip"
    res = train_sample_clip(cfg)
    print(f"{res.model_id}: {res.pairs} pairs, loss {res.losses[0]} -> {res.losses[-1]}, "
          f"train image->answer R@1 {res.retrieval_at_1:.3f}, {res.size_bytes / 1e6:.2f} MB in {res.folder}, "
          f"{res.seconds:.0f} s")
    if args.check:
        from safetensors.numpy import load_file

        new = load_file(str(res.folder / WEIGHTS_FILE))
        old = load_file(str(SAMPLE_CLIP_DIR / WEIGHTS_FILE))
        diff = max(float(np.abs(new[k].astype(np.float32) - old[k].astype(np.float32)).max()) for k in old)
        print(f"max |new - shipped| over all weights: {diff:.3g} ({'identical' if diff == 0 else 'differs'})")
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
