"""The ``qscope`` command line: ``demo``, ``discover``, ``steer``, ``export``, ``inspect``, ``analyze``, ``train-sae``.

Every command takes ``--model`` (``tiny``, a hub id or a local directory) and ``--sae`` (``tiny``, a Qwen-Scope
release, or any :meth:`SparseAutoencoder.from_pretrained` source) with ``--layer``; corpora are text files (one
text per line), json/jsonl/csv/parquet files or saved datasets, with ``--text-column``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .analysis import FOOTPRINT_MODES
from .discovery import CONTRAST_BY
from .errors import ConfigError, OutputExistsError, QscopeError
from .output_scores import RANKINGS
from .steering import MODES, POSITIONS
from .training import PARALLEL

#: Mistakes a user can make on the command line: every refusal of qscope, and what the file system says (a path
#: that cannot be read or written). One line, exit 1.
USER_ERRORS = (QscopeError, OSError)


def _positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positions(text: str) -> str | list[int]:
    """argparse type: ``all``, ``prompt``, ``generated`` or comma-separated integer positions."""
    if text in POSITIONS:
        return text
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(POSITIONS)} or comma-separated integers such "
                                         f"as 0,-1, got {text!r}") from None


def _non_empty(text: str) -> str:
    """argparse type: a string with something in it."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _model_and_sae(args: argparse.Namespace):
    from .loading import load_model, load_sae

    model, tokenizer = load_model(args.model)
    sae = load_sae(args.sae, args.layer, k=args.k, model=model)
    return model, tokenizer, sae


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.model, args.sae, args.layer, args.prompt)


def _discover(args: argparse.Namespace) -> None:
    from .discovery import activation_stats, common_tokens, contrast_features, format_contrast
    from .loading import load_texts
    from .output_scores import format_ranking, logit_lens, output_scores, rank_features

    model, tokenizer, sae = _model_and_sae(args)
    corpus_a, corpus_b = (load_texts(path, args.text_column) for path in (args.a, args.b))
    excluded = (common_tokens(tokenizer, corpus_a[args.text_column], corpus_b[args.text_column])
                if args.drop_common else None)
    options = dict(text_column=args.text_column, skip_first=not args.keep_first, exclude_tokens=excluded,
                   batch_size=args.batch_size)
    stats_a = activation_stats(model, tokenizer, sae, corpus_a, **options)
    stats_b = activation_stats(model, tokenizer, sae, corpus_b, **options)
    empty = [name for name, stats in (("A", stats_a), ("B", stats_b)) if not stats[sae.layer].tokens]
    if empty:
        raise ConfigError(f"no token of corpus {' and '.join(empty)} is left to compare"
                          + (" (--drop-common removed every token: the corpora share their whole vocabulary)"
                            if args.drop_common else ""))
    if args.by in ("rate", "mean"):
        print(format_contrast(contrast_features(stats_a, stats_b, top=args.top, by=args.by)))
        return
    target = load_texts(args.target, args.text_column) if args.target else corpus_a
    contrast = contrast_features(stats_a, stats_b, top=args.pool)
    candidates = None if args.by == "output" else [r.feature for r in contrast]
    scores = output_scores(model, tokenizer, sae, candidates, target=target[args.text_column],
                           batch_size=4 * args.batch_size)
    ranked = rank_features(contrast, scores, by=args.by, top=args.top)
    lens = logit_lens(model, sae, [r.feature for r in ranked], top=5) if ranked else None
    print(format_ranking(ranked, lens.tokens(tokenizer) if lens else []))


def _steer(args: argparse.Namespace) -> None:
    from .calibration import NEUTRAL_TEXTS, calibrate_strength
    from .loading import load_texts
    from .steering import SAELogitsProcessor, Steering

    model, tokenizer, sae = _model_and_sae(args)
    spec = Steering(sae, args.feature, args.strength, positions=args.positions, mode=args.mode)
    if args.auto_strength:
        texts = (load_texts(args.calibration_texts, args.text_column)[args.text_column] if args.calibration_texts
                 else NEUTRAL_TEXTS)
        calibration = calibrate_strength(model, tokenizer, spec, texts, max_ce_increase=args.max_ce_increase)
        spec = calibration.steering
        print(f"calibrated strength {calibration.strength:.4g} (cross-entropy on neutral text "
              f"+{calibration.ce_increase:.3f} nats, budget {args.max_ce_increase})")
    inputs = tokenizer([args.prompt], return_tensors="pt").to(next(model.parameters()).device)
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    for name, extra in [("unsteered", {}), ("steered", {"logits_processor": [SAELogitsProcessor(model, spec)]})]:
        out = model.generate(**inputs, **options, **extra)
        print(f"--- {name}\n{tokenizer.decode(out[0, prompt_length:], skip_special_tokens=True)}")


def _export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .export import bake_steering, export_control_vector
    from .steering import Steering

    if args.out and Path(args.out).exists() and not args.overwrite:
        raise OutputExistsError(f"{args.out} exists: pass --overwrite to replace it")
    model, tokenizer, sae = _model_and_sae(args)
    spec = Steering(sae, args.feature, args.strength)
    if args.out:
        print(f"wrote {export_control_vector(spec, args.out, model=model, overwrite=args.overwrite)}")
    if args.bake:
        baked = bake_steering(model, spec)
        baked.save_pretrained(args.bake)
        tokenizer.save_pretrained(args.bake)
        print(f"wrote a steered checkpoint to {args.bake} (loads with AutoModelForCausalLM.from_pretrained)")
    if not (args.out or args.bake):
        raise ConfigError("pass --out FILE.gguf (llama.cpp control vector) and/or --bake DIR (steered checkpoint)")


def _inspect(args: argparse.Namespace) -> None:
    from .discovery import activation_stats
    from .hooks import layer_outputs
    from .loading import load_texts
    from .report import Report, token_activations

    model, tokenizer, sae = _model_and_sae(args)
    corpus = load_texts(args.texts, args.text_column)
    stats = activation_stats(model, tokenizer, sae, corpus, text_column=args.text_column,
                             batch_size=args.batch_size)[sae.layer]
    features = args.features or stats.fire_count.argsort(descending=True)[:5].tolist()
    shown = []
    for text in corpus[args.text_column][: args.show]:
        inputs = tokenizer(text, return_tensors="pt").to(next(model.parameters()).device)
        hidden = layer_outputs(model, [sae.layer], **inputs)[sae.layer][0]
        shown.append(token_activations(tokenizer, hidden, inputs["input_ids"][0], sae, features))
    report = Report(f"qscope inspect: {args.model}, SAE {args.sae} layer {sae.layer}")
    report.heatmap(features, shown, layer=sae.layer)
    report.top_contexts(stats, features)
    print(f"wrote {report.save(args.out)}")


def _train_sae(args: argparse.Namespace) -> None:
    import datasets

    from .loading import load_model, load_texts
    from .training import SAETrainer, TrainConfig, evaluate_saes

    model, tokenizer = load_model(args.model)
    corpora = [load_texts(path, args.text_column).select_columns([args.text_column]) for path in args.data]
    data = datasets.concatenate_datasets(corpora)
    config = TrainConfig(layers=args.layers, k=args.k, d_sae=args.d_sae, expansion=args.expansion, lr=args.lr,
                         total_tokens=args.tokens, batch_tokens=args.batch_tokens, context_length=args.context_length,
                         checkpoint_every=args.checkpoint_every, seed=args.seed, parallel=args.parallel)
    trainer = SAETrainer(model, tokenizer, config, text_column=args.text_column)
    saes = trainer.fit(data, args.out, resume=args.resume)
    if not trainer.writes_saes:  # parallel="data": rank 0 writes and evaluates the SAEs every process holds
        return
    print(f"wrote {len(saes)} SAEs (layers {sorted(saes)}) to {args.out}")
    if args.eval:
        held_out = load_texts(args.eval, args.text_column)[args.text_column]
        for layer, metrics in evaluate_saes(model, tokenizer, list(saes.values()), held_out).items():
            print(f"layer {layer}: " + ", ".join(f"{key} {value:.4g}" for key, value in metrics.as_dict().items()))
            for problem in metrics.problems:
                print(f"layer {layer}: WARNING: {problem}")


def _analyze(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from .analysis import (
        coverage_curve,
        footprints,
        overlap_matrix,
        plot_coverage,
        plot_overlap,
        ranking_redundancy,
        union,
    )
    from .loading import load_texts
    from .report import Report

    model, tokenizer, sae = _model_and_sae(args)
    names = args.names or [Path(path).stem for path in args.benchmarks]
    if len(names) != len(args.benchmarks):
        raise ConfigError(f"{len(names)} names for {len(args.benchmarks)} benchmarks")
    prints = {name: footprints(model, tokenizer, sae, load_texts(path, args.text_column), mode=args.mode,
                               text_column=args.text_column, batch_size=args.batch_size)
              for name, path in zip(names, args.benchmarks)}
    curves = {name: coverage_curve(p) for name, p in prints.items()}
    out = Path(args.out)
    report = Report(f"qscope analyze: {', '.join(names)} (layer {sae.layer}, {args.mode} tokens)")
    rows = "".join(f"<tr><td>{name}</td><td>{len(p)}</td><td>{len(union(p))}</td><td>{curves[name].auc():.3f}</td>"
                   f"<td>{curves[name].auc() * len(p) / max(len(union(p)), 1):.3f}</td></tr>"
                   for name, p in prints.items())
    report.parts.append("<h2>Footprints</h2><table><tr><th>benchmark</th><th>N</th><th>|F(D)|</th>"
                        f"<th>AUC(c_n)</th><th>redundancy R̂</th></tr>{rows}</table>")
    report.image(plot_coverage(curves, out.with_suffix(".coverage.png")), "feature coverage curves")
    report.image(plot_overlap(names, overlap_matrix(prints), out.with_suffix(".overlap.png")),
                 "asymmetric overlap |F(row) ∩ F(column)| / |F(row)|")
    if args.scores:
        try:
            scores = json.loads(Path(args.scores).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"--scores {args.scores} is not valid JSON: {error}") from None
        if not isinstance(scores, dict):
            raise ConfigError(f"--scores {args.scores} must hold a JSON object {{benchmark: {{model: [scores]}}}}")
        cells = "".join(f"<tr><td>{name}</td><td>{ranking_redundancy(scores[name]):.3f}</td></tr>"
                        for name in names if name in scores)
        report.parts.append("<h2>Ranking-stability redundancy R (Kendall τ, 10% subsets)</h2>"
                            f"<table><tr><th>benchmark</th><th>R</th></tr>{cells}</table>")
    for name, p in prints.items():
        redundancy = curves[name].auc() * len(p) / max(len(union(p)), 1)
        print(f"{name}: N={len(p)}, |F(D)|={len(union(p))}, R̂={redundancy:.3f}")
    print(f"wrote {report.save(out)}")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="'tiny', a hub id or a local model directory")
    parser.add_argument("--sae", default="tiny", help="'tiny', a Qwen-Scope release id or a local SAE path")
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--k", type=_positive, default=None, help="TopK k, for a bare .sae.pt outside a release")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--batch-size", type=_positive, default=8)


def build_parser() -> argparse.ArgumentParser:
    """The ``qscope`` command line: one sub-command per workflow."""
    parser = argparse.ArgumentParser(prog="qscope", description="Qwen-Scope sparse autoencoders for HF and TRL")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="features of a prompt and steering by contrast (offline: SmolLM2)")
    demo.add_argument("--model", default="smollm2", help="'smollm2' (default), 'tiny', a hub id or a directory")
    demo.add_argument("--sae", default=None, help="SAE source (default: the shipped SmolLM2 SAEs)")
    demo.add_argument("--layer", type=int, default=None)
    demo.add_argument("--prompt", type=_non_empty, default=None)
    demo.set_defaults(run=_demo)

    discover = commands.add_parser("discover", help="features that tell corpus A from corpus B")
    _common(discover)
    discover.add_argument("--a", required=True, help="corpus A (texts to steer towards)")
    discover.add_argument("--b", required=True, help="corpus B")
    discover.add_argument("--top", type=_positive, default=10)
    discover.add_argument("--by", choices=[*CONTRAST_BY, *RANKINGS[1:]], default="rate",
                          help="rate/mean: contrast of corpus A vs B (what features respond to); output: every feature "
                               "by its output score towards --target; both: the --pool contrast candidates that "
                               "also have a positive output score")
    discover.add_argument("--target", default=None, help="texts whose vocabulary output scores reward (default: A)")
    discover.add_argument("--pool", type=_positive, default=100, help="contrast candidates scored with --by both")
    discover.add_argument("--keep-first", action="store_true", help="count each text's first token too")
    discover.add_argument("--drop-common", action="store_true", help="ignore tokens that occur in both corpora")
    discover.set_defaults(run=_discover)

    steer = commands.add_parser("steer", help="generate with and without steering a feature")
    _common(steer)
    steer.add_argument("--prompt", type=_non_empty, required=True)
    steer.add_argument("--feature", type=int, nargs="+", required=True)
    steer.add_argument("--strength", type=float, nargs="+", default=[1.0],
                       help="one per feature; with --auto-strength only their signs and ratios matter")
    steer.add_argument("--auto-strength", action="store_true",
                       help="scale the strengths until the loss on neutral text rises by --max-ce-increase nats")
    steer.add_argument("--max-ce-increase", type=float, default=0.5)
    steer.add_argument("--calibration-texts", default=None, help="texts for --auto-strength (default: built-in)")
    steer.add_argument("--positions", type=_positions, default="all",
                       help="all, prompt, generated, or comma-separated indices")
    steer.add_argument("--mode", choices=MODES, default="add")
    steer.add_argument("--max-new-tokens", type=_positive, default=40)
    steer.set_defaults(run=_steer)

    export = commands.add_parser("export", help="steering as a llama.cpp control vector or a steered checkpoint")
    _common(export)
    export.add_argument("--feature", type=int, nargs="+", required=True)
    export.add_argument("--strength", type=float, nargs="+", required=True, help="one per feature (baked in)")
    export.add_argument("--out", default=None, help="control-vector GGUF for llama.cpp --control-vector-scaled")
    export.add_argument("--overwrite", action="store_true")
    export.add_argument("--bake", default=None, help="directory for a checkpoint with the steering in its weights")
    export.set_defaults(run=_export)

    inspect = commands.add_parser("inspect", help="HTML report: per-token heatmaps and top contexts")
    _common(inspect)
    inspect.add_argument("--texts", required=True, help="the corpus to inspect")
    inspect.add_argument("--features", type=int, nargs="*", help="default: the 5 most frequent")
    inspect.add_argument("--show", type=_positive, default=5, help="texts shown as heatmaps")
    inspect.add_argument("--out", default="qscope_report.html")
    inspect.set_defaults(run=_inspect)

    analyze = commands.add_parser("analyze", help="benchmark footprints: coverage, redundancy, overlap (HTML)")
    _common(analyze)
    analyze.add_argument("--benchmarks", nargs="+", required=True, help="json/jsonl/csv/parquet/txt files")
    analyze.add_argument("--names", nargs="*", default=None)
    analyze.add_argument("--mode", choices=FOOTPRINT_MODES, default="all", help="footprint over all or last tokens")
    analyze.add_argument("--scores", default=None, help="JSON {benchmark: {model: [per-sample scores]}}")
    analyze.add_argument("--out", default="qscope_analysis.html")
    analyze.set_defaults(run=_analyze)

    train = commands.add_parser("train-sae", help="train TopK SAEs on a model's residual stream")
    train.add_argument("--model", default="tiny", help="'tiny', 'smollm2', a hub id or a local model directory")
    train.add_argument("--layers", type=int, nargs="+", required=True)
    train.add_argument("--data", nargs="+", required=True, help="training corpora (text files, json/csv/parquet)")
    train.add_argument("--text-column", default="text")
    train.add_argument("--out", required=True, help="output directory (Qwen-Scope layout + SAELens)")
    train.add_argument("--k", type=_positive, default=32)
    train.add_argument("--d-sae", type=_positive, default=None)
    train.add_argument("--expansion", type=_positive, default=8, help="d_sae = expansion x d_model unless --d-sae")
    train.add_argument("--lr", type=float, default=None)
    train.add_argument("--tokens", type=_positive, default=1_000_000)
    train.add_argument("--batch-tokens", type=_positive, default=4096)
    train.add_argument("--context-length", type=_positive, default=256)
    train.add_argument("--checkpoint-every", type=_positive, default=None)
    train.add_argument("--resume", action="store_true")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--parallel", choices=PARALLEL, default="data",
                       help="under torchrun / accelerate launch: split the texts (data) or the layers over processes")
    train.add_argument("--eval", default=None, help="held-out corpus for FVU, L0, dead latents and spliced loss")
    train.set_defaults(run=_train_sae)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run one command. A user error (a bad value, a missing file or column) prints one line and exits 1;
    ``--debug`` shows the traceback instead."""
    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except USER_ERRORS as error:
        if args.debug:
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"qscope {args.command}: error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
