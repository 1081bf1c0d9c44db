"""Cross-modal entropy on the CPU: the former dense PyTorch path vs ``meda.kv.entropy`` at a VLM-like shape.

One layer of random float32 post-RoPE queries and keys shaped like the reference VLM (meda-vlm-mini:
9 query heads over 3 KV heads, head_dim 64) on a prompt laid out like mm-needle at 32 images: a short
text prefix, then per image a few text tokens and a contiguous block of vision tokens, then the
question (defaults: 19 + 32 x (6 + 64) + 50 = 2,309 tokens, 89% vision). The dense path (the code that
``cross_modal_entropy_sums`` ran off CUDA before) computes every query row against all keys and masks
the same-modality ones away; the current function computes the two cross-modal blocks only. Prints
the best of ``--reps`` wall times of each, their ratio and the largest difference of the results.

    python benchmarks/entropy_cpu.py                 # < 1 min on 2 cores
    python benchmarks/entropy_cpu.py --images 64     # a longer prompt
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import Tensor

from meda.kv.entropy import cross_modal_entropy_sums
from meda.kv.scoring import causal_logit_chunks


def dense_sums(query: Tensor, key: Tensor, vision: Tensor, valid: Tensor, *, scaling: float, query_chunk: int):
    """The former path: ``(sums [B, 2], counts [B, 2])`` from logits of each query chunk against all N keys."""
    sums = torch.zeros(query.shape[0], 2)
    counts = torch.zeros(query.shape[0], 2)
    for positions, logits, visible in causal_logit_chunks(query, key, valid, scaling=scaling, query_chunk=query_chunk):
        query_vision = vision.gather(1, positions)  # [B, c]
        hidden = ~(visible & (vision[:, None, :] != query_vision[..., None]))[:, None, None]  # [B,1,1,c,N]
        log_probs = torch.log_softmax(logits.masked_fill_(hidden, float("-inf")), dim=-1)
        del logits
        row_entropy = -log_probs.exp().mul_(log_probs).masked_fill_(hidden, 0.0).sum(dim=(-1, 1, 2))  # [B, c]
        del log_probs
        eligible = ~hidden[:, 0, 0].all(dim=-1)
        rows = torch.stack((~query_vision, query_vision), dim=-1) & eligible[..., None]  # [B, c, 2]
        sums += (row_entropy[..., None] * rows).sum(dim=1)
        counts += rows.sum(dim=1)
    return sums, counts


def vlm_layout(images: int, image_tokens: int, text_between: int, prefix: int, question: int) -> Tensor:
    """``BoolTensor [1, N]``, True at vision tokens: prefix, per image some text and a vision block, question."""
    per_image = [False] * text_between + [True] * image_tokens
    return torch.tensor([[False] * prefix + per_image * images + [False] * question])


def best_seconds(fn: Callable[[], object], reps: int) -> float:
    """Best wall time of ``reps`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32, help="images in the prompt (default 32)")
    parser.add_argument("--image-tokens", type=int, default=64, help="vision tokens per image (default 64)")
    parser.add_argument("--text-between", type=int, default=6, help="text tokens before each image (default 6)")
    parser.add_argument("--prefix", type=int, default=19, help="text tokens before the first image (default 19)")
    parser.add_argument("--question", type=int, default=50, help="text tokens after the last image (default 50)")
    parser.add_argument("--q-heads", type=int, default=9, help="query heads (default 9)")
    parser.add_argument("--kv-heads", type=int, default=3, help="KV heads (default 3)")
    parser.add_argument("--head-dim", type=int, default=64, help="head dimension (default 64)")
    parser.add_argument("--query-chunk", type=int, default=512, help="query rows per chunk (default 512)")
    parser.add_argument("--reps", type=int, default=5, help="timed calls of each path, best kept (default 5)")
    args = parser.parse_args()

    vision = vlm_layout(args.images, args.image_tokens, args.text_between, args.prefix, args.question)
    n = vision.shape[1]
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(1, args.q_heads, n, args.head_dim, generator=gen)
    key = torch.randn(1, args.kv_heads, n, args.head_dim, generator=gen)
    valid = torch.ones_like(vision)
    options = {"scaling": args.head_dim**-0.5, "query_chunk": args.query_chunk}

    dense = dense_sums(query, key, vision, valid, **options)
    blocks = cross_modal_entropy_sums(query, key, vision, valid, **options)
    dense_s = best_seconds(lambda: dense_sums(query, key, vision, valid, **options), args.reps)
    blocks_s = best_seconds(lambda: cross_modal_entropy_sums(query, key, vision, valid, **options), args.reps)
    print(
        f"N={n} tokens ({int(vision.sum())} vision, {vision.float().mean().item():.1%}), Hq={args.q_heads}, "
        f"Hkv={args.kv_heads}, D={args.head_dim}, query_chunk={args.query_chunk}, {torch.get_num_threads()} threads"
    )
    diff = (dense[0] - blocks[0]).abs().max().item()
    relative = ((dense[0] - blocks[0]).abs() / dense[0].abs().clamp_min(1e-30)).max().item()
    print(f"{'dense (former) s':>16} {'blocks (now) s':>14} {'speed-up':>8} {'max |diff|':>10} {'max rel.':>8} counts")
    print(
        f"{dense_s:16.4f} {blocks_s:14.4f} {dense_s / blocks_s:7.1f}x {diff:10.1e} {relative:8.1e} "
        f"{'equal' if torch.equal(dense[1], blocks[1]) else 'DIFFER'}"
    )
    print(f"sums (text rows, vision rows): {dense[0].tolist()} (dense), {blocks[0].tolist()} (blocks)")


if __name__ == "__main__":
    main()
