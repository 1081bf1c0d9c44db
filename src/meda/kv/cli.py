"""``meda kv ...``: compress the KV cache of a transformers model and measure it."""

from __future__ import annotations

from pathlib import Path

import typer

from meda.kv.recipes import METHODS

app = typer.Typer(
    no_args_is_help=True,
    help=(
        "Run a transformers LLM or VLM with a compressed KV cache (MEDA, StreamingLLM, H2O, SnapKV, "
        "PyramidKV, LOOK-M, AdaKV, VL-Cache) and report kept tokens per layer and real cache bytes.\n\n"
        "Start with: meda kv run --model smollm2-135m --method meda --budget 0.2 --prompt @notes.txt "
        "(a prompt of at least 32 tokens, the observation window; @file reads a file)"
    ),
)

METHOD_HELP = " | ".join(METHODS)  # every recipe name, from the one table
# what bad input raises, printed as one line and exit code 2 (ModuleNotFoundError: a built-in model's package)
USER_ERRORS = (ValueError, TypeError, NotImplementedError, OSError, ModuleNotFoundError)


def parse_budget_text(text: str) -> float | int:
    """'0.2' -> 0.2 (kept fraction); '256' -> 256 (kept tokens per layer)."""
    try:
        return float(text) if any(c in text for c in ".eEn") else int(text)
    except ValueError:
        raise typer.BadParameter(f"budget {text!r} is neither a fraction like 0.2 nor a token count like 256") from None


def parse_options(items: list[str]) -> dict[str, object]:
    """``["tau=0.5", "merge=pivot"]`` -> ``{"tau": 0.5, "merge": "pivot"}`` (numbers parsed)."""
    out: dict[str, object] = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"option {item!r} must look like name=value, e.g. tau=0.5")
        name, value = item.split("=", 1)
        out[name.strip()] = _number_or_text(name.strip(), value.strip())
    return out


# recipe fields where "none" is a choice of its own, not Python's None
_NONE_IS_A_CHOICE = {"merge"}


def _number_or_text(name: str, v: str) -> object:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    if v.lower() == "none" and name in _NONE_IS_A_CHOICE:
        return "none"
    return {"true": True, "false": False, "none": None}.get(v.lower(), v)


@app.command()
def run(
    prompt: str = typer.Option(..., "--prompt", "-p", help="The user message (use @file.txt to read a file)."),
    model: str = typer.Option(
        "smollm2-135m", help="Local path, cached hub id, or a built-in: smollm2-135m, gemma3-270m, meda-vlm-mini."
    ),
    method: str = typer.Option("meda", help=METHOD_HELP),
    budget: str = typer.Option(
        "0.2", help="Kept share of the prompt's KV cache: a fraction in (0, 1] such as 0.2 (1.0 = the full cache), "
        "or an int >= 2 (tokens/layer)."
    ),
    image: list[Path] = typer.Option([], "--image", help="Image file(s) for a vision-language model; repeatable."),
    max_new_tokens: int = typer.Option(32, min=1, help="Tokens to generate (greedy)."),
    option: list[str] = typer.Option(
        [], "--option", "-o", help="Recipe override name=value, e.g. -o tau=0.5 -o merge=pivot; repeatable."
    ),
    attn: str = typer.Option("sdpa", help="Attention implementation: sdpa or eager."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    decode: str = typer.Option(
        "dynamic",
        help="dynamic (transformers' decode loop), static (fast path: static buffers, CUDA graph on GPU; "
        "same tokens) or compiled (static with the layers' norms, MLPs and rotary embedding compiled by "
        "torch.compile).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Generate an answer with a compressed cache and show what the compression kept.

    Prints the answer, kept tokens per layer as a bar chart, and the real bytes of the KV
    cache before and after compression. budget=1.0 keeps everything (same output as full).

    \b
    Examples:
      meda kv run --model smollm2-135m --method meda --budget 0.2 --prompt @notes.txt
      meda kv run --model meda-vlm-mini --image red.png --prompt "What does the image show?" --budget 1.0
      meda kv run --model /path/to/model --method snapkv --budget 256 -o window=16 --prompt @doc.txt --json
    """
    from meda.kv.recipes import resolve_recipe
    from meda.kv.run import run_once
    from meda.kv.session import DECODE_MODES, parse_budget

    options = parse_options(option)
    try:  # check what needs no model first, so a typo fails before a long load
        resolve_recipe(method, **options)
        if decode not in DECODE_MODES:
            raise ValueError(f"--decode {decode!r} is not one of {', '.join(DECODE_MODES)}")
        parsed_budget = parse_budget(parse_budget_text(budget))
        text = Path(prompt[1:]).read_text() if prompt.startswith("@") else prompt
        result = run_once(
            model,
            text,
            method=method,
            budget=parsed_budget,
            images=image,
            max_new_tokens=max_new_tokens,
            options=options,
            attn_implementation=attn,
            device=device,
            decode=decode,
        )
    except USER_ERRORS as err:
        from meda.report import console

        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(code=2) from err
    if as_json:
        from meda.report import print_json

        print_json(result)
    else:
        from meda.kv.run import print_result

        print_result(result)


@app.command()
def bench(
    preset: str = typer.Option("qwen2-7b", help="Comma list of real shapes (random weights): qwen2-7b, qwen2-vl-7b."),
    tokens: str = typer.Option("32768", help="Comma list of prompt lengths in tokens."),
    batch: str = typer.Option("1", help="Comma list of batch sizes (text presets; the VL prompt is batch 1)."),
    methods: str = typer.Option("stock,full,snapkv,meda", help=f"Comma list: {METHOD_HELP}, or stock (no session)."),
    budgets: str = typer.Option("0.05,0.2", help="Comma list of kept fractions, e.g. 0.05,0.1,0.2."),
    decode: str = typer.Option(
        "static",
        help="Comma list of decode paths for the compressed runs: static (fast path), compiled (static with the "
        "norms, MLPs and rotary embedding compiled by torch.compile) and/or dynamic.",
    ),
    decode_tokens: int = typer.Option(32, min=2, help="Tokens decoded per run (median ms/token over them)."),
    image_side: int = typer.Option(64, min=2, help="Image grid side in patches for VL presets (tokens = side^2 / 4)."),
    option: list[str] = typer.Option(
        [], "--option", "-o", help="Recipe override for every compressed run, e.g. -o entropy_queries=2048."
    ),
    only: str = typer.Option("", help="Comma list of substrings: run only cases whose key contains one, e.g. /b8/."),
    out: Path = typer.Option(None, help="Folder: results.jsonl grows one line per case as it is measured."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines instead of a table."),
) -> None:
    """GPU decode speed against the memory-bandwidth floor: stock loop vs compressed caches (needs CUDA).

    Each case (key PRESET/TOKENS/bBATCH/METHOD/BUDGET/DECODE) reports prefill seconds, the median
    decode ms/token of generate, the GPU time of one captured step (static), peak memory, real KV
    bytes, and the floor: decoder weights + kept KV bytes over the copy bandwidth measured in the
    same run. Example (Qwen2-7B shape, 32k tokens):

        meda kv bench --tokens 32768 --methods stock,full,snapkv --budgets 0.05 --out runs/speed
    """
    import json

    from meda.kv.bench import print_rows, run_speed, speed_cases
    from meda.report import print_json

    def items(text: str) -> list[str]:
        return [x.strip() for x in text.split(",") if x.strip()]

    try:
        cases = speed_cases(
            items(preset),
            [int(x) for x in items(tokens)],
            [int(x) for x in items(batch)],
            items(methods),
            [float(x) for x in items(budgets)],
            ["stock", *items(decode)],
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    planned = len(cases)
    if only:
        cases = [c for c in cases if any(part in c.key for part in items(only))]
    rows = []
    jsonl = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        jsonl = (out / "results.jsonl").open("a")
    if not cases:
        example = "qwen2-7b/32768/b1/snapkv/0.05/static"
        raise typer.BadParameter(f"--only {only!r} matches none of the {planned} cases (keys look like {example})")
    import torch

    if not torch.cuda.is_available():
        from meda.report import console

        console.print("[red]error:[/red] meda kv bench measures GPU speed; no CUDA device is visible")
        raise typer.Exit(code=2)
    for row in run_speed(cases, decode_tokens=decode_tokens, image_side=image_side, options=parse_options(option)):
        rows.append(row)
        if jsonl is not None:
            jsonl.write(json.dumps(row) + "\n")
            jsonl.flush()
        if as_json:
            print_json(row)
    if not as_json:
        print_rows(rows)


@app.command("eval")
def eval_(
    task: str = typer.Option(
        ...,
        "--task",
        "-t",
        help="Comma list: passkey, multikey, vartrack (text), mm-needle, mm-count, mm-order, "
        "mm-assoc (multimodal), or milebench:PATH (MileBench data: a TASK/TASK.json folder or a root of them).",
    ),
    model: str = typer.Option(
        "smollm2-135m", help="smollm2-135m, gemma3-270m, meda-vlm-mini, a local path or a cached hub id."
    ),
    methods: str = typer.Option(
        "full,snapkv,meda",
        help=f"Comma list of {METHOD_HELP}; with options use ';' between methods, e.g. 'snapkv;meda:tau=4,merge=none'.",
    ),
    budgets: str = typer.Option("0.05,0.1,0.2,0.4", help="Comma list of kept fractions (or ints: tokens per layer)."),
    samples: int = typer.Option(8, min=1, help="Samples per task and size (MileBench: the first N rows)."),
    seed: int = typer.Option(0, help="Sample i of a task is generated from seed + i."),
    sizes: str = typer.Option(
        "",
        help="Comma list of sizes for every task (tokens for text tasks, images for multimodal); "
        "default each task's own (text: 1024,2048,4096,8192).",
    ),
    new_tokens: int = typer.Option(0, min=0, help="Answer length in tokens (0 = the task's own)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    out: Path = typer.Option(Path("runs/eval"), help="Folder for results.json, results.md and accuracy_TASK.png."),
    as_json: bool = typer.Option(False, "--json", help="Print results.json on stdout instead of the table."),
    question_after: bool = typer.Option(
        False,
        "--question-after-compression",
        help="Multimodal tasks: compress each prompt up to its last image first, then feed the question over the "
        "compressed cache, so every answer token (a one-token count too) reads the compressed cache.",
    ),
) -> None:
    """Accuracy and fidelity of compressed caches on long-context tasks, against the full cache.

    Every sample is answered once by the full cache; every method x budget then answers from a
    compressed cache. Per cell it reports the task accuracy (exact match; ROUGE-L for open MileBench
    answers), the share of the full cache's answer tokens the compressed cache predicts the same way
    (teacher-forced), and the mean KL of its next-token distributions from the full cache's.

    Small CPU run (about a minute):

        meda kv eval --task passkey --methods full,snapkv,meda --budgets 0.1 --samples 2 --sizes 1024

    Writes OUT/results.json (rewritten after every sample), OUT/results.md and one accuracy-vs-budget
    PNG per task. See docs/kv-eval.md.
    """
    from meda.kv.eval.harness import check_question_after, evaluate, parse_method, resolve_tasks, split_methods
    from meda.kv.models import load_model
    from meda.kv.run import pick_device
    from meda.kv.session import parse_budget
    from meda.report import console

    try:
        specs = resolve_tasks([t.strip() for t in task.split(",") if t.strip()])
        method_list = split_methods(methods)
        budget_list = [parse_budget_text(b.strip()) for b in budgets.split(",") if b.strip()]
        for spec in method_list:
            parse_method(spec)
        for b in budget_list:
            parse_budget(b)
        size_list = [int(s) for s in sizes.split(",") if s.strip()] or None
        if question_after:
            check_question_after(specs, method_list)
        dev = pick_device(device)
        loaded, processor = load_model(model, device=dev)
        payload = evaluate(
            loaded,
            processor,
            model_name=model,
            tasks=specs,
            methods=method_list,
            budgets=budget_list,
            samples=samples,
            seed=seed,
            sizes=size_list,
            device=dev,
            new_tokens=new_tokens or None,
            out=out,
            question_after_compression=question_after,
        )
    except USER_ERRORS as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(code=2) from err
    _show_eval(payload, out, as_json)


def _show_eval(payload: dict, out: Path, as_json: bool) -> None:
    """Write ``out/results.md`` and the accuracy plots of an evaluation payload, then print its table."""
    from meda.kv.eval.output import markdown_table, plot_accuracy
    from meda.report import console, print_json

    table = markdown_table(payload)
    (out / "results.md").write_text(table + "\n")
    plots = plot_accuracy(payload, out)
    if as_json:
        print_json(payload)
    else:
        console.print(table, markup=False, highlight=False)
        console.print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {len(plots)} plot(s)")


@app.command("eval-merge")
def eval_merge(
    shards: list[Path] = typer.Argument(..., help="Folders (or results.json files) of `meda kv eval` runs."),
    out: Path = typer.Option(Path("runs/eval"), help="Folder for the merged results.json, results.md and plots."),
    as_json: bool = typer.Option(False, "--json", help="Print the merged results.json instead of the table."),
) -> None:
    """Merge `meda kv eval` runs over disjoint seeds (or tasks) into one results.json, table and plots.

    A long grid runs faster as processes side by side, each over its own seeds:

        for s in 0 4 8; do meda kv eval --task mm-needle --samples 4 --seed $s --out runs/ev-s$s & done; wait
        meda kv eval-merge runs/ev-s0 runs/ev-s4 runs/ev-s8 --out runs/ev

    Accuracy is weighted by samples, token agreement and KL by compared positions. Shards of different
    models, or two shards sharing a seed in one cell, are refused.
    """
    import json

    from meda.kv.eval.merge import merge_payloads
    from meda.report import console, write_json

    files = [s / "results.json" if s.is_dir() else s for s in shards]
    try:
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"no results.json at {', '.join(missing)}: pass the --out folders of meda kv eval")
        payload = merge_payloads([json.loads(f.read_text()) for f in files], names=[str(f.parent) for f in files])
    except (ValueError, OSError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(code=2) from err
    write_json(out / "results.json", payload)
    _show_eval(payload, out, as_json)
