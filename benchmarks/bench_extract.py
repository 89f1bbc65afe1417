"""Batched cue and feature extraction vs the released code's one-item-at-a-time loop.

Same model, same inputs, measured side by side (random weights: timing only, outputs compared):

1. CLIP ViT-B/32-sized (open_clip ``ViT-B-32``, random weights) on the first ``--mentions`` mentions
   of the bundled sample plus all its entity descriptions. The released loop
   (``prepare_wikipedia.py::convert_examples_to_features`` + ``neg_clip_extract.py``) encodes, per
   mention, ``mention + " [SEP] " + sentence``, the mention, the image and the cue, each as a batch
   of one with 77 tokens, then every entity description one by one. dimkit runs
   ``features.run`` end to end with an empty store (image check, hashing, cue replay,
   batched encoding, durable writes), then once more with the store full.
2. A small BLIP-2-shaped model (``dimkit_dev.tiny_blip2.random_blip2("small")``): the released loop calls the
   processor and ``generate(max_new_tokens=20)`` per image; dimkit's ``TransformersExpert`` batches.

``--throughput`` instead prints images per second for a CLIP architecture and a BLIP-2 preset on a
device (fp16 on CUDA), e.g. ``--throughput --device cuda --clip-arch ViT-B-32 --blip2 opt-2.7b``.

    python benchmarks/bench_extract.py                 # CPU, several minutes on 2 shared cores
    python benchmarks/bench_extract.py --mentions 24 --images 16 --blip2-batch 16 --repeat 1   # quicker
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


#: Texts per image in the real one-image-per-mention datasets (MIMIC split sizes: mentions over all
#: splits, KB size; no cue for WikiDiverse, as the released code): the share of text encoding in a full
#: extraction run. (RichpediaMEL mentions can have several images each, so it is left out.)
MIX = {"WikiMEL": (3 * 25846 + 109976) / 25846,
       "WikiDiverse": (2 * (11351 + 1664 + 2078) + 132460) / (11351 + 1664 + 2078)}


def _hr(title: str) -> None:
    print(f"\n== {title}")


def _row(name: str, loop_s: float, batched_s: float) -> None:
    print(f"  {name:<34} released loop {loop_s:8.2f} s   dimkit {batched_s:8.2f} s   ratio {loop_s / batched_s:6.1f}x")


def _fastest(cases: dict, repeat: int) -> dict[str, float]:
    """Seconds per case: every case runs ``repeat`` times, alternating, and its fastest run is kept
    (other processes share these CPUs; a burst of outside load should not decide a ratio)."""
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(repeat):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def bench_dataset(n_mentions: int):
    """A prepared subset of the bundled sample (first n mentions, all entities) in a temp folder."""
    from dimkit import datasets

    sample = datasets.load("sample")
    m = sample.mentions.head(n_mentions).copy()
    root = datasets.dataset_dir("bench")
    root.mkdir(parents=True, exist_ok=True)
    link = root / "images"
    if not link.exists():
        link.symlink_to((sample.root / "images").resolve(), target_is_directory=True)
    datasets.write_prepared(root, m, sample.entities, {"layout": "bench"})
    return datasets.load("bench")


def released_clip_loop(cm, ds, cues: dict):
    """The released per-item loop: four batch-of-one CLIP calls per mention, one per entity."""
    from PIL import Image

    model, preprocess, tokenize = cm.model, cm.preprocess, cm.tokenizer
    out = {"mention": [], "mention_sentence": [], "image": [], "cue": [], "entity": []}
    skipped = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for _, r in ds.mentions.iterrows():
            out["mention_sentence"].append(model.encode_text(tokenize([r["mention"] + " [SEP] " + r["sentence"]])))
            out["mention"].append(model.encode_text(tokenize([r["mention"]])))
            try:
                img = preprocess(Image.open(ds.image_path(r["image"]))).unsqueeze(0)
                out["image"].append(model.encode_image(img))
            except Exception:  # the released code would crash here; we skip and count
                skipped += 1
                out["image"].append(None)
            cue = cues.get(r["mention_id"])
            out["cue"].append(model.encode_text(tokenize([cue])) if cue else None)
        t_mentions = time.perf_counter() - t0
        t1 = time.perf_counter()
        for desc in ds.entities["description"]:
            out["entity"].append(model.encode_text(tokenize([desc if isinstance(desc, str) else "None"])))
        t_entities = time.perf_counter() - t1
    return out, t_mentions, t_entities, skipped


def bench_clip(n_mentions: int, arch: str, repeat: int) -> list[float]:
    """CLIP: the released loop vs features.run; returns end-to-end, text, image ratios."""
    from dimkit import clip, cues, features

    _hr(f"CLIP {arch} (random weights), {n_mentions} mentions of the sample + 103 entity descriptions, CPU")
    ds = bench_dataset(n_mentions)
    cm = clip.load_clip(f"{arch}:random", device="cpu")
    cue_map = cues.get_cues(ds, "sample-oracle", progress=False).to_dict()

    # Other processes share this machine's CPUs: each side runs `repeat` times, alternating, and the
    # fastest run of each is kept, so a burst of outside load does not decide the ratio.
    t_loop = t_m = t_e = t_cold = t_warm = float("inf")
    for r in range(repeat):
        loop, m_s, e_s, skipped = released_clip_loop(cm, ds, cue_map)
        if m_s + e_s < t_loop:
            t_loop, t_m, t_e = m_s + e_s, m_s, e_s
        store_root = Path(os.environ["DIMKIT_CACHE"]) / f"features-run{r}"  # empty store each time
        cfg = features.FeaturesConfig.for_dataset(ds.name, clip=f"{arch}:random", expert="sample-oracle",
                                                  device="cpu", workers=2, store=store_root)
        t0 = time.perf_counter()
        res = features.run(cfg, dataset=ds, progress=False)
        fs, rep = res.features, res.report
        t_cold = min(t_cold, time.perf_counter() - t0)
        t0 = time.perf_counter()
        features.run(cfg, dataset=ds, progress=False)
        t_warm = min(t_warm, time.perf_counter() - t0)

    # Same numbers? (ordering and dedup must not change any vector)
    diffs = []
    for name in ("mention", "mention_sentence", "cue"):
        for i, v in enumerate(loop[name]):
            if v is not None:
                diffs.append(float(np.abs(getattr(fs, name)[i] - v.numpy()[0]).max()))
    from dimkit.images import load_image
    for i, v in enumerate(loop["image"]):
        # Palette/CMYK/16-bit/alpha files: dimkit's loader converts them better than PIL's plain
        # .convert("RGB") inside open_clip's transform, so their vectors differ on purpose.
        plain = load_image(ds.image_path(ds.mentions["image"][i])).converted is None
        if v is not None and fs.image_ok[i] and plain:
            diffs.append(float(np.abs(fs.image[i] - v.numpy()[0]).max()))
    for i, v in enumerate(loop["entity"]):
        if isinstance(ds.entities["description"][i], str):
            diffs.append(float(np.abs(fs.entity[i] - v.numpy()[0]).max()))

    # Component view: pure model time, texts and images separately, on the same distinct inputs.
    m = ds.mentions
    texts = list(dict.fromkeys(m["mention"].tolist() + (m["mention"] + " [SEP] " + m["sentence"]).tolist()
                               + [c for c in cue_map.values() if c] + ds.entities["description"].dropna().tolist()))
    imgs = [load_image(ds.image_path(p)).image for p in m["image"]]
    imgs = [i for i in imgs if i is not None]
    # Full-context texts (77 tokens, like long LLM-written descriptions): nothing to trim, so only
    # the batching itself helps. Built by chaining the sample's descriptions.
    descs = ds.entities["description"].dropna().tolist()
    long_texts = [" ".join(descs[i:] + descs[:i])[:1000] for i in range(0, min(len(descs), 48))]
    lengths = (cm.tokenizer(texts) != 0).sum(dim=1).float()

    def loop_texts(ts):
        with torch.no_grad():
            for t in ts:
                cm.model.encode_text(cm.tokenizer([t]))

    def loop_images(ims):
        with torch.no_grad():
            for im in ims:
                cm.model.encode_image(cm.preprocess(im).unsqueeze(0))

    t = _fastest({"long loop": lambda: loop_texts(long_texts), "long": lambda: cm.encode_texts(long_texts),
                  "text loop": lambda: loop_texts(texts), "text": lambda: cm.encode_texts(texts),
                  "img loop": lambda: loop_images(imgs), "img": lambda: cm.encode_images(imgs, workers=2)},
                 repeat)

    n_txt, n_img = rep.texts["distinct"], rep.images["distinct"]
    print(f"  mix: {n_txt / max(n_img, 1):.1f} distinct texts per image here; WikiMEL {MIX['WikiMEL']:.1f}, "
          f"WikiDiverse {MIX['WikiDiverse']:.1f} (mention, mention + sentence, cue per mention plus the KB's "
          "descriptions; '+' datasets also encode the original descriptions)")
    print(f"  vectors: {rep.texts['distinct']} distinct texts, {rep.images['distinct']} images; "
          f"released loop skipped {skipped} unreadable image(s); max |dimkit - loop| = {max(diffs):.2e}")
    _row("end to end, empty store", t_loop, t_cold)
    _row("end to end, rerun (store full)", t_loop, t_warm)
    _row(f"texts only ({len(texts)} distinct)", t["text loop"], t["text"])
    print(f"  {'':<34} (mean {lengths.mean():.1f} tokens of 77 with start/end: the released loop runs all 77)")
    _row(f"77-token texts only ({len(long_texts)})", t["long loop"], t["long"])
    _row(f"images only ({len(imgs)})", t["img loop"], t["img"])
    print(f"  released loop split: mentions {t_m:.2f} s, entities {t_e:.2f} s")
    return [t_loop / t_cold, t["text loop"] / t["text"], t["long loop"] / t["long"], t["img loop"] / t["img"]]


def bench_blip2(n_images: int, preset: str, batch_sizes: list[int], repeat: int) -> dict[int, float]:
    """BLIP-2: the released per-image generate loop vs TransformersExpert batches; ratio per batch size."""
    from PIL import Image

    from dimkit import datasets
    from dimkit.experts import RELEASED_PROMPT, CueItem, TransformersExpert
    from dimkit_dev.tiny_blip2 import random_blip2

    _hr(f"BLIP-2 '{preset}'-shaped (random weights), {n_images} images, 20 new tokens, CPU fp32")
    model, processor = random_blip2(preset)
    n_params = sum(p.numel() for p in model.parameters())
    sample = datasets.load("sample")
    from dimkit.images import load_image
    paths = [sample.image_path(p) for p in sample.mentions["image"].head(n_images * 2)]
    paths = [p for p in paths if load_image(p).ok][:n_images]

    processor.tokenizer.padding_side = "left"
    items = [CueItem(image_sha256=str(i), path=p, rel=p.name, image=load_image(p).image) for i, p in enumerate(paths)]
    experts = {bs: TransformersExpert.from_model(model, processor, model_id=f"random-blip2-{preset}", batch_size=bs)
               for bs in batch_sizes}
    t_loop = float("inf")
    t_batched = {bs: float("inf") for bs in batch_sizes}
    answers: dict[int, list[str]] = {}
    for _ in range(repeat):  # alternating, fastest of each kept (the CPUs are shared)
        t0 = time.perf_counter()
        loop_out = []
        for p in paths:  # released convert_caption: one image per processor + generate call
            inputs = processor(images=Image.open(p).convert("RGB"), text=RELEASED_PROMPT, return_tensors="pt")
            with torch.no_grad():
                ids = model.generate(**inputs, max_new_tokens=20)
            ids = ids[:, inputs["input_ids"].shape[1]:]
            loop_out.append(processor.batch_decode(ids, skip_special_tokens=True)[0].strip())
        t_loop = min(t_loop, time.perf_counter() - t0)
        for bs, ex in experts.items():
            t0 = time.perf_counter()
            out = []
            for i in range(0, len(items), bs):
                out += [a.text for a in ex.describe(items[i:i + bs])]
            t_batched[bs] = min(t_batched[bs], time.perf_counter() - t0)
            answers[bs] = out
    print(f"  {n_params / 1e6:.1f} M parameters; identical answers to the loop: "
          + ", ".join(f"batch {bs} {sum(a == b for a, b in zip(answers[bs], loop_out))}/{len(items)}"
                      for bs in batch_sizes))
    for bs in batch_sizes:
        _row(f"cues, batch {bs}", t_loop, t_batched[bs])
    return {bs: t_loop / t_batched[bs] for bs in batch_sizes}


def throughput(device: str, arch: str, preset: str, clip_batch: int, blip_batch: int, n: int) -> None:
    """Images per second of batched CLIP image encoding and BLIP-2 cue generation on ``device``."""
    from PIL import Image

    from dimkit import clip
    from dimkit.experts import CueItem, TransformersExpert
    from dimkit_dev.tiny_blip2 import random_blip2

    fp16 = device.startswith("cuda")
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)) for _ in range(n)]
    cm = clip.load_clip(f"{arch}:random", device=device, precision="fp16" if fp16 else "fp32")
    px = cm.preprocess_images(imgs, workers=4)
    def per_second(work, batch: int, n_items: int) -> float:
        """Items per second of ``work(start, stop)`` over ``n_items`` in batches, after one warm-up
        batch; CUDA is synchronised around the timed part (kernels run asynchronously)."""
        work(0, batch)
        if fp16:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, n_items, batch):
            work(i, i + batch)
        if fp16:
            torch.cuda.synchronize()
        return n_items / (time.perf_counter() - t0)

    rate = per_second(lambda a, b: cm.encode_pixels(px[a:b]), clip_batch, n)
    print(f"  CLIP {arch} image encoding: {rate:8.1f} images/s (batch {clip_batch}, {cm.precision}, "
          f"preprocessing excluded)")
    model, processor = random_blip2(preset, dtype=torch.float16 if fp16 else None, device=device)
    ex = TransformersExpert.from_model(model, processor, model_id="tp", batch_size=blip_batch, device=device)
    items = [CueItem(str(i), Path("."), "x", im) for i, im in enumerate(imgs[:max(blip_batch * 2, 8)])]
    rate = per_second(lambda a, b: ex.describe(items[a:b]), blip_batch, len(items))
    print(f"  BLIP-2 {preset}-shaped cues (20 new tokens): {rate:8.2f} images/s "
          f"(batch {blip_batch}, {'fp16' if fp16 else 'fp32'})")


def main() -> int:
    """Parse arguments, run the comparisons (or --throughput), print the summary."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mentions", type=int, default=24,
                   help="mentions of the sample (with all 103 entity descriptions); 24 gives about 6 distinct "
                        "texts per image, fewer than any real dataset has (see the printed mix)")
    p.add_argument("--images", type=int, default=64, help="images for the BLIP-2 comparison")
    p.add_argument("--clip-arch", default="ViT-B-32")
    p.add_argument("--blip2", default="small", help="BLIP-2 preset: tiny, small, opt-2.7b")
    p.add_argument("--blip2-batch", default=None,
                   help="comma-separated batch sizes to compare (default: 8,16 and dimkit's default)")
    p.add_argument("--repeat", type=int, default=2, help="runs per side (fastest kept: the CPUs are shared)")
    p.add_argument("--skip-clip", action="store_true")
    p.add_argument("--skip-blip2", action="store_true")
    p.add_argument("--throughput", action="store_true", help="images/s on --device instead of the comparison")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress visible when piped to a file

    from dimkit.experts import DEFAULT_HF_BATCH

    blip_batches = ([int(b) for b in args.blip2_batch.split(",")] if args.blip2_batch
                    else sorted({8, 16, DEFAULT_HF_BATCH}))
    tmp = Path(tempfile.mkdtemp(prefix="dimkit-bench-"))
    os.environ["DIMKIT_DATA"] = str(tmp / "data")
    os.environ["DIMKIT_CACHE"] = str(tmp / "cache")
    print(f"python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, device {args.device}; random weights (timing only)")
    if args.throughput:
        _hr(f"throughput on {args.device}")
        throughput(args.device, args.clip_arch, args.blip2, 256, max(blip_batches),
                   512 if args.device != "cpu" else 64)
        return 0
    if args.device != "cpu":
        print("the side-by-side comparison runs on CPU; use --throughput for a GPU")
    ratios = {}   # name -> (ratio, whether the 5x target applies to it)
    if not args.skip_clip:
        end, texts, long_texts, images = bench_clip(args.mentions, args.clip_arch, args.repeat)
        ratios["clip end-to-end"] = (end, True)
        ratios["clip texts (component)"] = (texts, False)
        ratios["clip 77-token texts (component)"] = (long_texts, False)
        ratios["clip images (component)"] = (images, False)
    if not args.skip_blip2:
        per_batch = bench_blip2(args.images, args.blip2, blip_batches, args.repeat)
        for bs, r in per_batch.items():
            default = bs == DEFAULT_HF_BATCH
            ratios[f"blip2 cues, batch {bs}" + (" (default)" if default else "")] = (r, default)
    _hr("summary (target: batched extraction >= 5x the released loop, at dimkit's defaults)")
    for k, (v, target) in ratios.items():
        verdict = ("ok" if v >= 5 else "BELOW 5x") if target else "-"
        print(f"  {k:<30} {v:6.1f}x  {verdict}")
    if "clip images (component)" in ratios:
        print("  On a CPU the encoders are compute-bound: ViT-B/32 and the 77-token text transformer at batch 1\n"
              "  already reach about half of the matmul peak, so batching alone gains about 2x. The rest of the\n"
              "  end-to-end gain comes from not computing: texts run only up to their longest row (the loop\n"
              "  always runs 77 positions) and each distinct text or image is encoded once. With long texts\n"
              "  (LLM-written descriptions near 77 tokens) and many images the CPU gain tends to the 2x floor.")
    cuda = torch.cuda.is_available()
    print("  " + ("GPU images/s: run with --throughput --device cuda" if cuda
                  else "no GPU on this machine: GPU images/s not measured (run with --throughput --device cuda)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
