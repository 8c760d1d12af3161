"""The `mlmtune` command: parse flags into a config, call one library function, print.

Flags are generated from the config dataclasses (`--block-size` is `DataConfig.block_size`),
so the CLI, `--config FILE.yaml` and the Python API share one schema (`reference_markdown` writes
docs/cli.md from the same parsers). Errors a user can cause print one line: exit 2 for a command
line that does not parse (an unknown flag, a missing value), exit 1 for everything else.

Only the config schema is imported at start-up. Each command resolves its config, which validates
every value, and only then imports what it runs: torch, transformers and datasets take seconds to
import, and `mlmtune --help`, a mistyped flag or a bad value must answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from mlmtune.config import QUICKSTART_DEFAULTS, EvalConfig, PrepareConfig, ProbeConfig, TrainConfig
from mlmtune.errors import MlmtuneError, warn
from mlmtune.inference_config import ExportConfig, FillConfig, ScoreConfig, ServeConfig
from mlmtune.options import field_doc, flat_fields, load_config_file, resolve
from mlmtune.training.stopping import LeftEarly, Stop


class _Parser(argparse.ArgumentParser):
    """argparse with mlmtune's one-line errors: no usage block, a pointer to --help instead (exit 2, as
    argparse exits). Subcommands' parsers are made of the same class."""

    def error(self, message: str):
        self.exit(2, f"mlmtune: error: {message} (see `{self.prog} --help`)\n")


def _add_config_flags(parser: argparse.ArgumentParser, cls: type, defaults: dict[str, Any] | None = None) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                        help="read options from a YAML file (flags override it)")
    for name, (tp, default) in flat_fields(cls).items():
        doc = field_doc(cls, name)
        if defaults and name in defaults:  # the command's own default replaces any the field's doc names
            default, doc = defaults[name], re.sub(r"\s*\(default: [^)]*\)", "", doc)
        flag = "--" + name.replace("_", "-")
        doc = doc.replace("%", "%%")  # argparse formats help with %
        if tp is bool:
            parser.add_argument(flag, action="store_const", const=True, default=argparse.SUPPRESS, help=doc)
        elif "list[" in str(tp):  # repeatable: --model A --model B (or --model A,B)
            shown = "" if default is None else f" (default: {','.join(default)})"
            parser.add_argument(flag, metavar=name.upper(), action="append", default=argparse.SUPPRESS,
                                help=f"{doc}{shown}".strip())
        else:
            shown = "" if default is None else f" (default: {default})".replace("%", "%%")
            parser.add_argument(flag, metavar=name.upper(), default=argparse.SUPPRESS, help=f"{doc}{shown}".strip())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mlmtune", description="Masked-language-model fine-tuning, "
                                     "perplexity and fill-mask.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("train", help="fine-tune a model with the masked-LM objective")
    _add_config_flags(p, TrainConfig)
    p = sub.add_parser("check", help="check a training config and estimate its time and memory, without training")
    _add_config_flags(p, TrainConfig)
    p.add_argument("--no-probe", action="store_true", help="skip the timed probe of a few training steps")
    p.add_argument("--show-masks", type=int, metavar="N", help="print, instead of the checks, the first N blocks "
                   "the run trains on, masked as it masks them: [piece] masked, [piece=] kept, [piece>other] "
                   "replaced by a random piece")
    p.add_argument("--json", action="store_true", help="with --show-masks: one JSON object per block (input_ids, "
                   "labels, word_ids, tokens)")
    p = sub.add_parser("prepare", help="load, split, tokenize and group a corpus into blocks (save_to_disk)")
    _add_config_flags(p, PrepareConfig)
    p = sub.add_parser("eval", help="perplexity on fixed masks (and pseudo-perplexity)")
    _add_config_flags(p, EvalConfig)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = sub.add_parser("probe", help="does a model help a downstream task? a classifier on its encoder, scored "
                                     "before and after (several models side by side)")
    _add_config_flags(p, ProbeConfig)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = sub.add_parser("fill", help="fill <mask> / [MASK] / <|mask|> in texts (arguments, or one per line on stdin)")
    _add_config_flags(p, FillConfig)
    p.add_argument("--json", action="store_true", help="one JSON line per text, as pipeline('fill-mask') returns")
    p.add_argument("texts", nargs="*", help="texts with a mask; read from stdin when none are given")
    p = sub.add_parser("score", help="pseudo-log-likelihood of texts (arguments, stdin, or --dataset), by word")
    _add_config_flags(p, ScoreConfig)
    p.add_argument("--json", action="store_true", help="one JSON object per text: text, pll, words, tokens "
                   "(and per_word)")
    p.add_argument("texts", nargs="*", help="texts to score; read from stdin when none are given (or --dataset)")
    p = sub.add_parser("serve", help="fill masks over HTTP (POST / or /fill, GET /health, /info, /metrics, /docs, "
                                     "/ playground)")
    _add_config_flags(p, ServeConfig)
    p = sub.add_parser("export", help="a model folder with its ONNX graphs (onnx/model.onnx; --quantize int8), "
                                      "checked against PyTorch")
    _add_config_flags(p, ExportConfig)
    p = sub.add_parser("quickstart", help="offline demo: adapt a small pretrained model to the Python docs")
    _add_config_flags(p, TrainConfig, QUICKSTART_DEFAULTS)
    return parser


def reference_markdown() -> str:
    """The CLI reference (docs/cli.md): every subcommand's usage and flags, as `--help` prints them."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = ["# CLI reference", "",
             "Every flag of every subcommand, as `mlmtune COMMAND --help` prints it. This page is generated from",
             "the parsers by `python -m mlmtune.cli --reference > docs/cli.md`, and a test checks that it matches",
             "them. Every option can also be given in a `--config FILE.yaml`",
             "(`block_size: 64`, or nested under its group as `data: {block_size: 64}` or",
             "`optim: {learning_rate: 1.0e-4}`, as the saved `mlmtune_config.yaml` is); flags override the file.", ""]
    for name, command in sub.choices.items():
        command.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=100)
        parts += [f"## mlmtune {name}", "", "```", command.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


def _config(cls: type, args: argparse.Namespace, base: dict[str, Any] | None = None):
    given = {k: ",".join(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in flat_fields(cls)}
    file_values = dict(base or {})
    if getattr(args, "config", None):
        file_values.update(load_config_file(args.config))
    return resolve(cls, file_values, given)


def cmd_train(args) -> int:
    stop = Stop()
    stop.install()  # before torch loads: a signal during start-up leaves in one line, not by its default (-15)
    cfg = _config(TrainConfig, args)  # every value checked before the heavy imports
    if cfg.output.export == "onnx":  # before hours of training, not after
        from mlmtune.model.onnx_runtime import import_onnxruntime

        import_onnxruntime()
    from mlmtune.training.card import summary_lines
    from mlmtune.training.train import train  # heavy (torch, transformers): imported when the command runs

    result = train(cfg, stop=stop)
    if result.rank != 0:  # one report per run, not one per process
        return 0
    for line in summary_lines(result.metrics):
        print(line)
    print(f"model saved in {result.output_dir}")
    if cfg.output.export == "onnx":
        from mlmtune.inference.onnx_export import export_into_run
        from mlmtune.model.load import load_model

        model, tokenizer = load_model(str(result.output_dir))
        export_into_run(result.output_dir, model, tokenizer, quantize="int8")
        print(f"exported to {result.output_dir / 'onnx'}")
    return 0


def cmd_quickstart(args) -> int:
    cfg = _config(TrainConfig, args, QUICKSTART_DEFAULTS)
    from mlmtune.quickstart import quickstart  # heavy: imported when the command runs

    _, report = quickstart(cfg)
    print(report)
    return 0


def cmd_check(args) -> int:
    cfg = _config(TrainConfig, args)
    if args.show_masks is not None and args.show_masks < 1:
        raise MlmtuneError(f"--show-masks must be a positive number of blocks, got {args.show_masks}")
    from mlmtune.training.check import masked_examples, preflight, render_masks  # heavy: imported when the command runs

    if args.show_masks is not None:
        examples, tokenizer = masked_examples(cfg, args.show_masks)
        for n, example in enumerate(examples, 1):
            print(json.dumps(example, ensure_ascii=False) if args.json else
                  f"block {n} (step {example['step']}):\n{render_masks(example, tokenizer)}\n")
        return 0
    report = preflight(cfg, probe=not args.no_probe)
    print("\n".join(report.lines()))
    if report.errors:
        print(f"mlmtune: error: {report.errors[0]}", file=sys.stderr)
        return 1
    return 0


def cmd_prepare(args) -> int:
    cfg = _config(PrepareConfig, args)
    from mlmtune.data.prepare import prepare_blocks
    from mlmtune.model.load import load_tokenizer  # heavy (transformers, datasets): imported when the command runs

    tokenizer = load_tokenizer(cfg.model)
    added = _add_tokens(cfg, tokenizer) if cfg.add_tokens else None
    blocks, stats = prepare_blocks(cfg.data, tokenizer, cfg.seed, save_to=cfg.output_dir, added=added)
    for split in blocks:
        print(f"{split}: {stats.blocks[split]:,} blocks of {cfg.data.block_size} tokens "
              f"({stats.dropped_tokens[split]} tokens dropped)")
    print(f"saved in {cfg.output_dir}")
    return 0


def _add_tokens(cfg: PrepareConfig, tokenizer) -> list[str]:
    """prepare --add-tokens: the words added to the tokenizer the blocks are made with (train adds the same)."""
    from mlmtune.data.prepare import check_prepare_target
    from mlmtune.data.text import load_texts
    from mlmtune.training.vocab import TOKENS_PER_WORD_TEXTS, choose_words, grow_tokenizer

    check_prepare_target(Path(cfg.output_dir))  # before the mining, as without --add-tokens
    texts = list(load_texts(cfg.data, cfg.seed)["train"]["text"])
    words = choose_words(cfg.add_tokens, cfg.add_numbers, texts, tokenizer)
    print(grow_tokenizer(tokenizer, words, texts[:TOKENS_PER_WORD_TEXTS])[1] + " on the training split")
    return words


def cmd_eval(args) -> int:
    cfg = _config(EvalConfig, args)
    from mlmtune.evaluation.evaluate import format_report, run_eval  # heavy: imported when the command runs

    result = run_eval(cfg)
    if args.json:
        print(json.dumps(result))
        return 0
    print(format_report(result))
    return 0


def cmd_probe(args) -> int:
    cfg = _config(ProbeConfig, args)
    from mlmtune.evaluation.downstream import format_table, run_probe  # heavy: imported when the command runs

    result = run_probe(cfg)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def _format_table(text: str, result) -> str:
    rows = [text]
    per_mask = result if result and isinstance(result[0], list) else [result]
    for n, preds in enumerate(per_mask, 1):
        if len(per_mask) > 1:
            rows.append(f"  mask {n}:")
        for rank, p in enumerate(preds, 1):
            if "pll" in p:  # a joint filling: ranked by the filled text's pseudo-log-likelihood
                rows.append(f"  {rank:>2}  pll {p['pll']:8.3f}  {' | '.join(p['token_strs']):<24} {p['sequence']}")
                continue
            pieces = f" ({p['pieces']} pieces)" if p.get("pieces", 1) > 1 else ""
            rows.append(f"  {rank:>2}  {p['score']:.4f}  {p['token_str'].strip() + pieces:<16} {p['sequence']}")
    return "\n".join(rows)


def read_stdin_lines() -> list[str]:
    """Non-empty lines of stdin; bytes that are not UTF-8 are replaced (U+FFFD) and counted in a warning."""
    from mlmtune.data.text import decode_line  # heavy (datasets): imported when a command reads stdin

    lines, bad = [], 0
    for raw in sys.stdin.buffer:
        line, valid = decode_line(raw)
        bad += not valid
        if line.strip():
            lines.append(line.rstrip("\r\n"))
    if bad:
        warn(f"{bad} line(s) of stdin are not valid UTF-8; the bad bytes were replaced with U+FFFD")
    return lines


def cmd_fill(args) -> int:
    cfg = _config(FillConfig, args)
    texts = args.texts or read_stdin_lines()
    if not texts:
        raise MlmtuneError("no text given: pass texts as arguments or one per line on stdin")
    from mlmtune.inference.fill import FillMask  # heavy: imported when the command runs

    filler = FillMask.from_pretrained(cfg.model, batch_size=cfg.batch_size, device=cfg.device,
                                      precision=cfg.precision, runtime=cfg.runtime, quantized=cfg.quantized)
    results = filler.fill(texts, top_k=cfg.top_k, targets=cfg.targets, max_pieces=cfg.max_pieces, joint=cfg.joint,
                          beam_size=cfg.beam_size)
    for text, result in zip(texts, results):
        print(json.dumps(result, ensure_ascii=False) if args.json else _format_table(text, result) + "\n")
    return 0


def cmd_score(args) -> int:
    cfg = _config(ScoreConfig, args)
    from mlmtune.data.text import load_texts  # heavy: imported when the command runs
    from mlmtune.inference.scoring import Scorer

    if cfg.data.dataset:
        split = load_texts(dataclasses.replace(cfg.data, test_size=0.0), 0)["train"]
        texts = list(split["text"][: cfg.max_texts])
    else:
        texts = args.texts or read_stdin_lines()
    if not texts:
        raise MlmtuneError("no text given: pass texts as arguments, one per line on stdin, or --dataset")
    scorer = Scorer.from_pretrained(cfg.model, batch_size=cfg.batch_size, device=cfg.device, precision=cfg.precision,
                                    runtime=cfg.runtime, quantized=cfg.quantized)
    encodings = scorer.encode(texts, truncate=bool(cfg.data.dataset))
    cut = sum(len(enc["input_ids"]) == scorer.max_length for enc in encodings)
    if cfg.data.dataset and cut:
        warn(f"{cut:,} of {len(texts):,} texts fill the model's {scorer.max_length} positions and may have been "
             f"cut there: their scores are of their first part")
    for result in scorer.score_encoded(texts, encodings, cfg.metric):
        if args.json:
            print(json.dumps(result.as_dict(cfg.per_word), ensure_ascii=False))
            continue
        print(f"{result.pll:10.3f}  {len(result.words)} words, {result.tokens} tokens  {result.text}")
        for w in result.words if cfg.per_word else []:
            pieces = f" ({w['pieces']} pieces)" if w["pieces"] > 1 else ""
            print(f"{w['pll']:14.3f}  {w['word']}{pieces}")
    return 0


def cmd_export(args) -> int:
    cfg = _config(ExportConfig, args)
    from mlmtune.inference.onnx_export import export_folder  # heavy (torch, onnx): imported when the command runs

    export_folder(cfg.model, cfg.output_dir, cfg.quantize)  # prints its checks as it goes
    print(f"exported to {cfg.output_dir} (onnx/ beside the model; its card has the checks)")
    return 0


def cmd_serve(args) -> int:
    cfg = _config(ServeConfig, args)
    from mlmtune.inference.fill import FillMask  # heavy (torch, fastapi): imported when the command runs
    from mlmtune.serving.serve import check_exposure, default_hosts, is_loopback, make_app, serve

    api_key = cfg.api_key if cfg.api_key is not None else os.environ.get("MLMTUNE_API_KEY")
    check_exposure(cfg.host, api_key, cfg.insecure)
    if cfg.insecure and not is_loopback(cfg.host) and api_key is None:
        warn(f"serving {cfg.host} with no API key (--insecure): anyone who can reach the port can use the model")
    # the model loads before the port is bound: a model that cannot load is an exit 1 here, not a
    # server that answers 500 for ever
    filler = FillMask.from_pretrained(cfg.model, batch_size=cfg.max_batch, safetensors_only=True, device=cfg.device,
                                      precision=cfg.precision, runtime=cfg.runtime, quantized=cfg.quantized)
    from mlmtune.serving.payloads import Limits

    hosts = cfg.allowed_hosts or default_hosts(cfg.host)
    if cfg.allowed_hosts is None and cfg.host in ("0.0.0.0", "::"):
        warn(f"requests must name this server as one of {', '.join(hosts)}: add the names clients use with "
             f"--allowed-hosts")
    app = make_app(filler, limits=Limits(max_body_bytes=cfg.max_body_bytes, max_work=cfg.max_work),
                   max_batch=cfg.max_batch, window_ms=cfg.batch_window_ms, max_queue=cfg.max_queue, api_key=api_key,
                   request_timeout=cfg.request_timeout, read_timeout=cfg.read_timeout, allowed_hosts=hosts,
                   limit_concurrency=cfg.limit_concurrency, docs=cfg.docs)
    serve(app, cfg.host, cfg.port, read_timeout=cfg.read_timeout)
    return 0


COMMANDS = {"train": cmd_train, "check": cmd_check, "prepare": cmd_prepare, "eval": cmd_eval, "fill": cmd_fill,
            "score": cmd_score, "probe": cmd_probe, "quickstart": cmd_quickstart, "serve": cmd_serve,
            "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the command's parser, so that the hint points at that command's --help
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return COMMANDS[args.command](args)
    except MlmtuneError as e:
        print(f"mlmtune: error: {e}", file=sys.stderr)
        return 1
    except LeftEarly as e:  # a signal before the run's first step (train() says where itself)
        print(f"mlmtune: error: {e.message()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mlmtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    if sys.argv[1:] == ["--reference"]:  # docs/cli.md
        print(reference_markdown(), end="")
        raise SystemExit(0)
    raise SystemExit(main())
