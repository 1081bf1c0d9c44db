"""``meda kv ...``: compress the KV cache of a transformers model and measure it."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    no_args_is_help=True,
    help=(
        "Run a transformers LLM or VLM with a compressed KV cache (MEDA, StreamingLLM, H2O, SnapKV, "
        "PyramidKV, LOOK-M, AdaKV) and report kept tokens per layer and real cache bytes.\n\n"
        "Start with: meda kv run --model smollm2-135m --method meda --budget 0.2 --prompt '...'"
    ),
)

METHOD_HELP = "full | streamingllm | h2o | snapkv | pyramidkv | lookm | adakv | meda"


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
        out[name.strip()] = _number_or_text(value.strip())
    return out


def _number_or_text(v: str) -> object:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(v.lower(), v)


@app.command()
def run(
    prompt: str = typer.Option(..., "--prompt", "-p", help="The user message (use @file.txt to read a file)."),
    model: str = typer.Option("smollm2-135m", help="Local path, cached hub id, or the built-in 'smollm2-135m'."),
    method: str = typer.Option("meda", help=METHOD_HELP),
    budget: str = typer.Option(
        "0.2", help="Kept share of the prompt's KV cache: a fraction in (0, 1] such as 0.2, or an int (tokens/layer)."
    ),
    image: list[Path] = typer.Option([], "--image", help="Image file(s) for a vision-language model; repeatable."),
    max_new_tokens: int = typer.Option(32, min=1, help="Tokens to generate (greedy)."),
    option: list[str] = typer.Option(
        [], "--option", "-o", help="Recipe override name=value, e.g. -o tau=0.5 -o merge=pivot; repeatable."
    ),
    attn: str = typer.Option("sdpa", help="Attention implementation: sdpa or eager."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Generate an answer with a compressed cache and show what the compression kept.

    Prints the answer, kept tokens per layer as a bar chart, and the real bytes of the KV
    cache before and after compression. budget=1.0 keeps everything (same output as full).
    """
    from meda.kv.recipes import resolve_recipe
    from meda.kv.run import run_once
    from meda.kv.session import parse_budget

    options = parse_options(option)
    try:  # check what needs no model first, so a typo fails before a long load
        resolve_recipe(method, **options)
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
        )
    except (ValueError, TypeError, NotImplementedError, OSError) as err:
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
    preset: str = typer.Option("qwen2-vl-7b", help="Real model shape with random weights: qwen2-vl-7b, qwen2.5-vl-7b."),
    tokens: int = typer.Option(32768, min=64, help="Prompt length in tokens (text around one image)."),
    methods: str = typer.Option("full,snapkv,meda", help=f"Comma list: {METHOD_HELP}, or stock (no session)."),
    budgets: str = typer.Option("0.2", help="Comma list of kept fractions, e.g. 0.1,0.2."),
    decode_tokens: int = typer.Option(16, min=2, help="Tokens decoded per run (timed per token)."),
    image_side: int = typer.Option(64, min=2, help="Image grid side in patches (tokens = side^2 / merge^2)."),
    option: list[str] = typer.Option(
        [], "--option", "-o", help="Recipe override for every compressed run, e.g. -o entropy_queries=1024."
    ),
    out: Path = typer.Option(None, help="Folder for results.json (optional)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """GPU speed and memory: prefill time, decode ms/token, real KV bytes per method (needs CUDA)."""
    from meda.kv.bench import print_bench, run_bench
    from meda.report import print_json, write_json

    result = run_bench(
        preset,
        tokens,
        [m.strip() for m in methods.split(",") if m.strip()],
        [float(b) for b in budgets.split(",") if b.strip()],
        decode_tokens=decode_tokens,
        image_side=image_side,
        options=parse_options(option),
    )
    if out is not None:
        write_json(out / "results.json", result)
    print_json(result) if as_json else print_bench(result)
