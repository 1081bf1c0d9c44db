"""meda.ctr side by side with FuxiCTR 2.3.10 and DeepCTR-Torch 0.3.0 on the same data.

One generated Criteo TSV is read and encoded once by meda (seeded 8:1:1 split, min-count 1,
log numerics); the encoded splits go to one ``.npz`` that every library trains on, so all
see the same ids, numerics and split. Each (library, model) runs in its own process, so
peak memory is per run:

- meda: its own ``Trainer`` (``meda ctr train``'s loop), in this environment; ``meda-graph`` is the same
  run with ``--graph on`` (the whole step replayed as one CUDA graph, CUDA only), as its own row;
- FuxiCTR / DeepCTR-Torch: their models (DNN, DeepFM, DCNv2) built from their own layers,
  trained by one plain loop written here (Adam, BCE, same batch, same shuffling rule), in a
  separate virtual environment this script creates under ``runs/`` (``torch==2.13.0`` first,
  so pip takes the CPU wheel on this disk; meda's own environment is never touched).

Same sizes everywhere: embedding dim 10, MLP 400-400-400, 3 cross layers, Adam 1e-3,
batch 4096, no regularisation, embeddings N(0, 1e-4^2). Reported per run: training
samples/s (optimiser steps only, evaluation excluded), peak memory (CPU: peak RSS of the
worker process; CUDA: max allocated), test AUC / logloss after epoch 1 and at the best
validation epoch.

    nice -n 10 .venv/bin/python benchmarks/ctr_peers.py --rows 100000 --epochs 2
    python3 benchmarks/ctr_peers.py --device cuda --rows 1000000 --epochs 2 --peers-site peers_site  # GPU host
                                                  # (on cuda the libraries default to meda,meda-graph,fuxictr,deepctr)

The FuxiCTR wheel's own ``model_zoo/LongCTR/DCNv2`` expects item-sequence inputs (it reads
``(batch, item_dict, mask)``), so for Criteo-format data the DCNv2 here is assembled from the
same FuxiCTR layers that class uses (``FeatureEmbedding``, ``CrossNetV2``, ``MLP_Block``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PEERS = {"fuxictr": "fuxictr==2.3.10", "deepctr": "deepctr-torch==0.3.0"}
PEER_EXTRAS = ["ray[data]"]  # FuxiCTR 2.3.10 imports ray's data loaders
STAND_INS = ("ray", "polars")  # imported by FuxiCTR at module level, never called by the layers used here
MODELS = ("dnn", "deepfm", "dcnv2")
MEDA = {"meda": "off", "meda-graph": "on"}  # meda's rows: library name -> TrainConfig.graph
SIZES = {"embedding_dim": 10, "hidden_units": [400, 400, 400], "cross_layers": 3, "lr": 1e-3, "batch_size": 4096}


# ------------------------------------------------------------------ driver (meda's environment)
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000, help="Rows of the generated Criteo TSV.")
    ap.add_argument("--epochs", type=int, default=2, help="Epochs per run (best epoch chosen on validation).")
    ap.add_argument("--device", default="cpu", help="cpu or cuda.")
    ap.add_argument("--libraries", default=None,
                    help="Comma list of meda, meda-graph (meda with --graph on; CUDA only), fuxictr, deepctr "
                         "(default: all of them on cuda, all but meda-graph on cpu).")  # fmt: skip
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--seeds", default="0", help="Seeds of init and shuffling, e.g. 0,1,2 (the split stays seed 0).")
    ap.add_argument("--work", default="runs/ctr_peers", help="Data, venv and per-run outputs.")
    ap.add_argument("--venv", default=None, help="Peers' venv (default WORK/venv; created when missing).")
    ap.add_argument("--peers-site", default=None,
                    help="Instead of a venv: a folder of the peers' packages (pip install --target) put on this "
                         "Python's path, e.g. on a GPU host whose CUDA torch must be used.")  # fmt: skip
    ap.add_argument("--json", default="docs/results/ctr_peers_{device}.json")
    ap.add_argument("--doc", default="docs/ctr-peers.md", help="Markdown file whose table is (re)written.")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--npz", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_work(args)), flush=True)
        if args.worker == "deepctr":  # its import starts a non-daemon thread asking PyPI for a newer version:
            os._exit(0)  # offline it could hold the exit for minutes
        return
    work = Path(args.work)
    npz = _prepare(work, args.rows)
    venv = Path(args.venv) if args.venv else work / "venv"
    libraries = (args.libraries or ",".join(["meda", *(["meda-graph"] if args.device != "cpu" else []),
                                             *PEERS])).split(",")  # fmt: skip
    unknown = sorted(set(libraries) - {*MEDA, *PEERS})
    if unknown:
        raise SystemExit(f"unknown libraries {unknown}; choose from {', '.join([*MEDA, *PEERS])}")
    if any(lib in PEERS for lib in libraries) and not args.peers_site:
        _ensure_venv(venv)
    out = Path(args.json.format(device=args.device))
    payload = {"rows": args.rows, "epochs": args.epochs, "device": args.device, "sizes": SIZES,
               "torch_threads": _threads(), "runs": []}  # fmt: skip
    if out.exists():  # runs of other libraries/models with the same settings are kept
        old = json.loads(out.read_text())
        if all(old.get(k) == payload[k] for k in ("rows", "epochs", "device", "sizes")):
            payload["runs"] = old["runs"]
    plan = [(seed, model, lib) for seed in _ints(args.seeds) for model in args.models.split(",") for lib in libraries]
    for seed, model, lib in plan:  # model by model: each comparison completes before the next model starts
        python = sys.executable if lib in MEDA or args.peers_site else str(venv / "bin" / "python")
        cmd = [python, __file__, "--worker", lib, "--model", model, "--npz", str(npz),
               "--epochs", str(args.epochs), "--device", args.device, "--seed", str(seed)]  # fmt: skip
        path = str(ROOT / "src") if lib in MEDA else args.peers_site
        env = {**os.environ, "PYTHONPATH": path} if path else None
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        key = (lib, model, seed)
        payload["failures"] = [f for f in payload.get("failures", []) if _key(f) != key]
        if done.returncode != 0:  # reported, and the other runs go on
            print(f"{lib} {model} seed {seed} failed:\n{done.stderr[-3000:]}", flush=True)
            payload["failures"].append({"library": lib, "model": model, "seed": seed, "error": done.stderr[-3000:]})
        else:
            result = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
            print(_line(result), flush=True)
            order = {name: i for i, name in enumerate([*MEDA, *PEERS])}
            runs = [r for r in payload["runs"] if _key(r) != key] + [result]
            payload["runs"] = sorted(runs, key=lambda r: (MODELS.index(r["model"]), order[r["library"]], _key(r)[2]))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=1))  # after every run: an interrupted benchmark keeps its runs
        _write_table(payload, Path(args.doc))
    print(f"wrote {out} and the {args.device} table of {args.doc}")


def _prepare(work: Path, rows: int) -> Path:
    """Generate the Criteo TSV, encode it with meda, write the splits to one .npz."""
    import numpy as np

    from meda.ctr import synthetic
    from meda.ctr.data import load_dataset

    tsv = work / f"criteo_{rows}.tsv"
    npz = work / f"criteo_{rows}.npz"
    if npz.exists():
        return npz
    work.mkdir(parents=True, exist_ok=True)
    if not tsv.exists():  # (ctr_throughput.py --format criteo --work WORK writes the same file)
        schema = synthetic.schema_for("criteo", "criteo")
        synthetic.write(synthetic.generate("criteo", rows, seed=0), tsv, "criteo", schema)
    ds = load_dataset(tsv, "criteo", seed=0)
    arrays: dict[str, Any] = {"vocab": np.array([f.vocab_size for f in ds.feature_map.categorical], dtype=np.int64)}
    for split in ("train", "valid", "test"):
        part = getattr(ds, split)
        arrays |= {f"{split}_cat": part.categorical, f"{split}_num": part.numeric, f"{split}_label": part.label}
    np.savez(npz, **arrays, tsv=np.array(str(tsv)))
    return npz


def _ensure_venv(venv: Path) -> None:
    """Create the peers' environment: torch 2.13.0 first (the CPU wheel on this disk), then the peers."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import fuxictr, deepctr_torch"],
                                          capture_output=True, check=False).returncode == 0:  # fmt: skip
        return
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, *PEERS.values(), *PEER_EXTRAS], check=True)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _line(r: dict[str, Any]) -> str:
    e1, best = r["epoch1"], r["best"]
    return (f"{r['library']:8s} {r['model']:7s} {r['samples_per_s']:>10,.0f} samples/s  peak {r['peak_mb']:>7.0f} MB  "
            f"epoch-1 AUC {e1['test_auc']:.4f}  best (epoch {best['epoch']}) {best['test_auc']:.4f}")  # fmt: skip


def _key(run: dict[str, Any]) -> tuple[str, str, int]:
    return run["library"], run["model"], run.get("seed", 0)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _mean_spread(values: list[float], digits: int = 4) -> str:
    """``mean`` of one value, ``mean ± sample std`` of several."""
    import statistics

    mean = f"{statistics.fmean(values):.{digits}f}"
    return mean if len(values) == 1 else f"{mean} ± {statistics.stdev(values):.{digits}f}"


def _write_table(payload: dict[str, Any], doc: Path) -> None:
    """The device's table in ``doc`` (between its markers): one row per library and model, mean (± std) over seeds,
    and the ratio of meda's samples/s to the fastest peer's per model."""
    device = payload["device"]
    lines = [f"Device {device}, {payload['rows']:,} rows (8:1:1), {payload['epochs']} epoch(s), torch threads "
             f"{payload['torch_threads']}; mean ± std over the seeds listed.", "",
             "| library | model | seeds | train samples/s | peak memory (MB) | epoch-1 test AUC | epoch-1 logloss "
             "| best epoch | best test AUC | best logloss |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in payload["runs"]:
        groups.setdefault((r["library"], r["model"]), []).append(r)
    speed = {k: sum(r["samples_per_s"] for r in rs) / len(rs) for k, rs in groups.items()}
    for (lib, model), rs in groups.items():
        e1, b = [r["epoch1"] for r in rs], [r["best"] for r in rs]
        lines.append(
            f"| {lib} | {model} | {','.join(str(r.get('seed', 0)) for r in rs)} | {speed[lib, model]:,.0f} | "
            f"{max(r['peak_mb'] for r in rs):.0f} | {_mean_spread([e['test_auc'] for e in e1])} | "
            f"{_mean_spread([e['test_logloss'] for e in e1])} | {','.join(str(e['epoch']) for e in b)} | "
            f"{_mean_spread([e['test_auc'] for e in b])} | {_mean_spread([e['test_logloss'] for e in b])} |"
        )
    ratios = []
    for model in MODELS:
        peers = [v for (lib, m), v in speed.items() if m == model and lib in PEERS]
        ours = [f"{lib} {speed[lib, model] / max(peers):.2f}x" for lib in MEDA if (lib, model) in speed and peers]
        if ours:
            ratios.append(f"{model}: {', '.join(ours)}")
    if ratios:
        lines += ["", "meda's samples/s over the fastest peer's: " + "; ".join(ratios) + "."]
    failed = [f"{f['library']} {f['model']} (seed {f['seed']})" for f in payload.get("failures", [])]
    if failed:
        lines += ["", "Failed runs (error in the JSON): " + ", ".join(failed) + "."]
    begin, end = f"<!-- peers:{device}:begin -->", f"<!-- peers:{device}:end -->"
    text = doc.read_text() if doc.exists() else "# meda.ctr and its peers\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    doc.write_text(f"{head}{begin}\n" + "\n".join(lines) + f"\n{end}{tail}")


# ------------------------------------------------------------------ workers (one process per run)
def _work(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    torch.set_flush_denormal(True)  # std-1e-4 embeddings: denormals slow CPU runs several-fold
    data = dict(np.load(args.npz))
    device = torch.device(args.device)
    stand_ins = _install_stand_ins() if args.worker == "fuxictr" else []
    if device.type == "cuda":
        _warm_up(device)
    runner = _run_meda if args.worker in MEDA else _run_peer
    record = runner(args.worker, args.model, data, args.epochs, device, args.seed)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _peak_rss_mb()
    epochs = record["epochs"]
    best = max(epochs, key=lambda e: e["valid_auc"])
    train_rows = len(data["train_label"])
    seconds = sum(e["train_seconds"] for e in epochs)
    return {"library": args.worker, "model": args.model, "seed": args.seed,
            "samples_per_s": train_rows * len(epochs) / seconds, "peak_mb": peak, "epoch1": epochs[0], "best": best,
            "epochs": epochs, "stand_ins": stand_ins, **{k: v for k, v in record.items() if k != "epochs"}}  # fmt: skip


def _warm_up(device: Any) -> None:
    """The same few untimed steps in every worker before its run (CUDA context, cuBLAS, the embedding, BCE and
    Adam kernels), so that no library's timed epoch pays the process's one-off start-up."""
    import torch
    from torch.nn import functional as F

    net = torch.nn.Sequential(torch.nn.Embedding(1000, 16), torch.nn.Flatten(), torch.nn.Linear(64, 1)).to(device)
    for fused in (False, True):
        opt = torch.optim.Adam(net.parameters(), fused=fused)
        for _ in range(3):
            opt.zero_grad()
            ids = torch.randint(0, 1000, (4096, 4), device=device)
            F.binary_cross_entropy_with_logits(net(ids).squeeze(1), torch.rand(4096, device=device)).backward()
            opt.step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)


def _peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's ``VmHWM`` belongs to the address space made at exec;
    ``ru_maxrss`` also counts what the forking driver held (its encoded data), so it is only the fallback."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_meda(lib: str, model: str, data: dict, epochs: int, device: Any, seed: int) -> dict[str, Any]:
    """meda's own Trainer on the same split (read back through meda's encoded-data cache); ``meda-graph``
    replays the step as a CUDA graph (its ``graph`` counts of metrics.json go into the result)."""
    from meda.ctr.data import load_dataset
    from meda.ctr.train import TrainConfig, train

    ds = load_dataset(str(data["tsv"]), "criteo", seed=0)
    assert len(ds.train) == len(data["train_label"]), "the cached split differs from the benchmark's"
    options = {"cross_layers": SIZES["cross_layers"]} if model == "dcnv2" else {}
    cfg = TrainConfig(model=model, mode="multi-epoch", epochs=epochs, batch_size=SIZES["batch_size"], lr=SIZES["lr"],
                      embedding_dim=SIZES["embedding_dim"], hidden_units=tuple(SIZES["hidden_units"]),
                      device=str(device), model_options=options, seed=seed, graph=MEDA[lib])  # fmt: skip
    payload = train(ds, cfg)
    # timing: the pass's optimiser steps, first step included, device synchronised at its end (as the peers' loop)
    out = [{"epoch": e["epoch"], "valid_auc": e["valid_auc"], "test_auc": e["test_auc"],
            "test_logloss": e["test_logloss"], "train_seconds": t["train_seconds"]}
           for e, t in zip(payload["epochs"], payload["timing"], strict=True)]  # fmt: skip
    return {"epochs": out, "graph": payload["graph"]}


class _StandIns:
    """Import-only stand-ins for packages FuxiCTR 2.3.10 imports at module level but that the layers this
    benchmark uses never call (``ray``: its Parquet data loader and dataset builder; ``polars``: its
    preprocessing and metrics helpers). Used only where the real package is missing (the GPU host, where
    ray's and polars' wheels alone exceed what one device call may carry): every attribute of a
    stand-in module is a class that raises when it is instantiated, so any real use fails loudly."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        import importlib.util

        if name.split(".")[0] not in self.names:
            return None
        return importlib.util.spec_from_loader(name, self, is_package=True)

    def create_module(self, spec: Any) -> Any:
        import types

        class StandIn(types.ModuleType):
            def __getattr__(self, attr: str) -> Any:
                if attr.startswith("__"):
                    raise AttributeError(attr)
                where = f"{self.__name__}.{attr}"

                def refuse(*_: Any, **__: Any) -> None:
                    raise RuntimeError(f"{where} is an import-only stand-in (ctr_peers.py): install the real package")

                return type(attr, (), {"__init__": refuse})

        return StandIn(spec.name)

    def exec_module(self, module: Any) -> None:
        """Nothing to run: attributes are made on access."""


def _install_stand_ins() -> list[str]:
    """Put stand-ins for FuxiCTR's unused module-level imports that are not installed; returns their names."""
    import importlib.util

    missing = tuple(n for n in STAND_INS if importlib.util.find_spec(n) is None)
    if missing:
        sys.meta_path.insert(0, _StandIns(missing))
    return list(missing)


def _run_peer(lib: str, model: str, data: dict, epochs: int, device: Any, seed: int) -> dict[str, Any]:
    """A FuxiCTR or DeepCTR-Torch model, trained by the one plain loop shared by the peers."""
    import numpy as np
    import torch
    from sklearn.metrics import log_loss, roc_auc_score
    from torch.nn import functional as F

    torch.manual_seed(seed)
    net, to_input, outputs_prob = (_fuxictr if lib == "fuxictr" else _deepctr)(model, data["vocab"], device)
    net.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=SIZES["lr"])
    split = {s: (torch.as_tensor(data[f"{s}_cat"], device=device), torch.as_tensor(data[f"{s}_num"], device=device),
                 torch.as_tensor(data[f"{s}_label"], device=device)) for s in ("train", "valid", "test")}  # fmt: skip
    loss_fn = F.binary_cross_entropy if outputs_prob else F.binary_cross_entropy_with_logits

    def predict(s: str) -> np.ndarray:
        net.eval()
        cat, num, _ = split[s]
        with torch.no_grad():
            out = torch.cat([net(to_input(cat[i : i + 16384], num[i : i + 16384])).reshape(-1)
                             for i in range(0, len(cat), 16384)])  # fmt: skip
        net.train()
        prob = out if outputs_prob else torch.sigmoid(out)
        return prob.double().cpu().numpy()

    cat, num, label = split["train"]
    n, bs, record = len(label), SIZES["batch_size"], []
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for i in range(0, n, bs):
            idx = order[i : i + bs]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(to_input(cat[idx], num[idx])).reshape(-1), label[idx])
            loss.backward()
            opt.step()
        loss.item()  # waits for the last step
        seconds = time.perf_counter() - started
        valid, test = predict("valid"), predict("test")
        y_test = data["test_label"]
        record.append({"epoch": epoch, "valid_auc": roc_auc_score(data["valid_label"], valid),
                       "test_auc": roc_auc_score(y_test, test),
                       "test_logloss": log_loss(y_test, np.clip(test, 1e-7, 1 - 1e-7)),
                       "train_seconds": seconds})  # fmt: skip
    return {"epochs": record}


def _fuxictr(model: str, vocab: Any, device: Any) -> tuple[Any, Any, bool]:
    """DNN / DeepFM / DCNv2 from FuxiCTR's layers over a FeatureMap describing the npz columns."""
    import torch
    from fuxictr.features import FeatureMap
    from fuxictr.pytorch.layers import CrossNetV2, FactorizationMachine, FeatureEmbedding, MLP_Block
    from fuxictr.pytorch.models import BaseModel
    from torch import nn

    fmap = FeatureMap("bench", "/tmp")
    n_num = 13
    for i in range(n_num):
        fmap.features[f"I{i + 1}"] = {"type": "numeric", "source": ""}
    for i, size in enumerate(vocab):
        fmap.features[f"C{i + 1}"] = {"type": "categorical", "source": "", "vocab_size": int(size)}
    fmap.num_fields = fmap.get_num_fields()
    dim, units = SIZES["embedding_dim"], SIZES["hidden_units"]
    fmap.default_emb_dim = dim
    names = list(fmap.features)

    def to_input(cat: torch.Tensor, num: torch.Tensor) -> dict[str, torch.Tensor]:
        cols = {names[i]: num[:, i] for i in range(n_num)}
        return cols | {names[n_num + i]: cat[:, i] for i in range(cat.shape[1])}

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = FeatureEmbedding(fmap, dim)
            in_dim = fmap.num_fields * dim
            head = model == "dcnv2"
            self.mlp = MLP_Block(in_dim, units, "ReLU", output_dim=None if head else 1)
            self.fm = FactorizationMachine(fmap) if model == "deepfm" else None
            self.cross = CrossNetV2(in_dim, SIZES["cross_layers"]) if head else None
            self.fc = nn.Linear(in_dim + units[-1], 1) if head else None

        def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
            emb = self.embedding(x)  # [B, fields, dim]
            flat = emb.flatten(start_dim=1)
            if self.cross is not None:
                return self.fc(torch.cat([self.cross(flat), self.mlp(flat)], dim=-1))
            out = self.mlp(flat)
            return out + self.fm(x, emb) if self.fm is not None else out

    net = Net()
    BaseModel.reset_parameters(net)  # FuxiCTR's own init: xavier-normal Linear layers, then each layer's init_weights
    return net, to_input, False


def _deepctr(model: str, vocab: Any, device: Any) -> tuple[Any, Any, bool]:
    """DeepCTR-Torch's DeepFM, DCN (matrix cross = DCN-M/DCNv2, no wide part) and WDL without its wide part (= DNN)."""
    import torch
    from deepctr_torch.inputs import DenseFeat, SparseFeat
    from deepctr_torch.models import DCN, WDL, DeepFM

    dim, units = SIZES["embedding_dim"], tuple(SIZES["hidden_units"])
    columns = [DenseFeat(f"I{i + 1}", 1) for i in range(13)]
    columns += [SparseFeat(f"C{i + 1}", int(size), embedding_dim=dim) for i, size in enumerate(vocab)]
    none = {"l2_reg_embedding": 0.0, "l2_reg_linear": 0.0, "l2_reg_dnn": 0.0, "init_std": 1e-4, "device": str(device)}
    if model == "deepfm":
        net = DeepFM(columns, columns, dnn_hidden_units=units, **none)
    elif model == "dcnv2":
        net = DCN([], columns, cross_num=SIZES["cross_layers"], cross_parameterization="matrix",
                  dnn_hidden_units=units, l2_reg_cross=0.0, **none)  # fmt: skip
    else:
        net = WDL([], columns, dnn_hidden_units=units, **none)

    def to_input(cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        return torch.cat([num, cat.float()], dim=1)  # DeepCTR-Torch reads ids from a float matrix

    return net, to_input, True


if __name__ == "__main__":
    main()
