"""``meda demo`` (kv part): the built-in SmolLM2-135M answers over a long context, full vs compressed."""

from __future__ import annotations

from meda.report import bar_chart, console, human_bytes, print_table

_FACTS = [
    "The harbour of Vell opens at dawn and closes when the lighthouse keeper rings the bell.",
    "Fishermen in Vell sell mackerel, cod and a small silver fish they call brin.",
    "The market square has a fountain shaped like a whale, built two hundred years ago.",
    "Children in Vell learn to tie sailing knots before they learn to read.",
    "Winter storms sometimes cut the road to the capital for several weeks.",
    "The town library keeps old maps of the coast, drawn by monks.",
]
_KEY_FACT = "The keeper of the lighthouse in Vell is a woman named Marta."


def filler_context(paragraphs: int, fact: str, depth: float = 0.5) -> str:
    """``paragraphs`` paragraphs of plausible filler with ``fact`` inserted at ``depth`` (0 = start, 1 = end)."""
    body = [" ".join(_FACTS[(i + j) % len(_FACTS)] for j in range(len(_FACTS))) for i in range(paragraphs)]
    body.insert(round(depth * paragraphs), fact)
    return "\n\n".join(body)


def demo_prompt(paragraphs: int = 12) -> str:
    """A long context with one key fact in the middle and a question at the end."""
    question = "Who is the keeper of the lighthouse in Vell?"
    context = filler_context(paragraphs, _KEY_FACT)
    return f"Read the text and answer the question.\n\n{context}\n\nQuestion: {question}"


# (label, method, options): the paper's MEDA beside the recipe the evaluation supports (docs/results.md)
DEMO_RUNS: tuple[tuple[str, str, dict], ...] = (
    ("full", "full", {}),
    ("snapkv", "snapkv", {}),
    ("meda-paper (average merge, tau 1)", "meda-paper", {}),
    ("meda (recommended)", "meda", {}),
)
VLM_ALIAS = "meda-vlm-mini"


def _compare(model, processor, inputs, budget: float, title: str) -> None:
    """Answer ``inputs`` with every :data:`DEMO_RUNS` method; print the KV bytes and the answers."""
    from meda.kv.run import generate_with

    rows, answers, last = [], [], None
    for label, method, options in DEMO_RUNS:
        b = 1.0 if method == "full" else budget
        res = generate_with(model, processor, inputs, method, b, max_new_tokens=16, options=options)
        rep = res["report"]
        if method == "meda":
            last = rep
        rows.append(
            [label, b, rep["kept_fraction"], human_bytes(rep["kv_bytes_before"]), human_bytes(rep["kv_bytes_after"])]
        )
        answers.append((label, res["answer"], res["seconds"]))
    print_table(title, ["method", "budget", "kept", "KV before", "KV after"], rows)
    for label, answer, seconds in answers:
        console.print(f"[bold]{label}[/bold] ({seconds:.1f} s): {answer}")
    if last is not None:
        bar_chart(
            "meda (recommended): kept tokens per layer",
            [f"L{i}" for i in range(len(last["layer_tokens"]))],
            [float(t) for t in last["layer_tokens"]],
        )
        for note in last["notes"]:  # e.g. why a text-only prompt gets uniform layer budgets
            console.print(f"note: {note}", markup=False, highlight=False)


VLM_DEMO_IMAGES = 16  # about 1,170 tokens: seconds per method on a CPU


def demo_needle(task, images: int = VLM_DEMO_IMAGES):
    """The first mm-needle sample (seeds 0, 1, ...) whose answer is a two-digit image number. SmolLM2 writes
    digits one token each, and compression happens after the prefill that yields the first answer token, so
    only an answer of two or more tokens shows the compressed cache at work (docs/results.md, "What a
    one-token answer cannot show")."""
    return next(s for s in (task.make(seed, images) for seed in range(1000)) if len(s.answer) > 1)


def _vlm_demo(device: str, budget: float) -> None:
    """The reference VLM on a multimodal needle with a two-digit answer, if it loads (docs/vlm.md says how
    well the shipped weights read images: the answers here are only as good as the full cache's)."""
    from meda.kv.eval.inputs import sample_inputs
    from meda.kv.eval.tasks import get_task
    from meda.kv.models import load_model

    try:
        model, processor = load_model(VLM_ALIAS, device=device)
        task = get_task("mm-needle")
    except (ValueError, OSError, ModuleNotFoundError, NotImplementedError) as err:
        console.print(f"[yellow]skipped the {VLM_ALIAS} demo:[/yellow] {err}")
        return
    sample = demo_needle(task)
    inputs = sample_inputs(processor, sample, device=device)
    console.rule(f"[bold]{VLM_ALIAS}[/bold]: {task.name}, {len(sample.images)} images")
    console.print(
        f"prompt: {inputs['input_ids'].shape[1]} tokens on {device}; the answer is {sample.answer}: its first digit "
        "comes from the prefill, before compression; the second is read from the compressed cache"
    )
    _print_vlm_status()
    _compare(model, processor, inputs, budget, f"KV cache per method ({VLM_ALIAS})")


def _print_vlm_status() -> None:
    """Say how well the shipped weights read images (their measured full-cache accuracy), so that nobody
    takes the answers below for evidence about compression when the model itself is at chance."""
    from meda.kv.vlm.weights import read_shipped

    _, meta = read_shipped()
    accuracy = meta.get("full_cache_accuracy", {})
    figures = ", ".join(f"{task} {acc:.2f}" for task, acc in accuracy.items())
    console.print(f"shipped weights, full-cache accuracy at {meta.get('full_cache_accuracy_images')} images: {figures}")
    if status := meta.get("status"):
        console.print(f"[yellow]status:[/yellow] {status} (docs/vlm.md)")


def run_demo(budget: float = 0.2, paragraphs: int = 8) -> None:
    from transformers.utils import logging as hf_logging

    from meda.kv.models import load_model
    from meda.kv.prompting import build_inputs
    from meda.kv.run import pick_device

    hf_logging.disable_progress_bar()  # the demo prints its own tables; weight-loading bars only clutter them
    device = pick_device("auto")
    console.rule("[bold]meda.kv demo[/bold]: SmolLM2-135M-Instruct, long context, compressed KV cache")
    model, tok = load_model("smollm2-135m", device=device)
    inputs = build_inputs(tok, demo_prompt(paragraphs), device=device)
    console.print(f"prompt: {inputs['input_ids'].shape[1]} tokens on {device}; the answer is Marta")
    _compare(model, tok, inputs, budget, "KV cache per method (SmolLM2-135M)")
    _vlm_demo(device, budget)
