"""`car embed`, `car rerank`, `car classify`, `car tokenize`, `car detokenize`."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..requests import ClassifyRequest, EmbedRequest, RerankRequest
from .common import (
    JsonOpt,
    ModelOpt,
    engine,
    err,
    fail,
    from_stdin,
    handle_errors,
    out,
    print_json,
    run,
    spinner,
    split_csv,
)


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def embed(
        texts: Annotated[list[str], typer.Argument(help="texts to embed; - reads stdin, a text a line")],
        model: ModelOpt = None,
        query: Annotated[bool, typer.Option("--query", help="embed as search queries")] = False,
        as_json: JsonOpt = False,
    ) -> None:
        """Embed texts (normalised vectors)."""
        if texts == ["-"]:  # as `car generate -` reads its prompt (it embedded the text "-")
            texts = [line for line in sys.stdin.read().splitlines() if line.strip()]
            if not texts:
                raise fail("stdin held no text to embed", 2)
        elif "-" in texts:  # stdin unread, "-" embedded as a text
            raise fail("- reads the texts from stdin, a text a line: give it alone, or texts alone", 2)
        if (empty := next((i for i, t in enumerate(texts, 1) if not t), None)) is not None:
            raise fail(f"text {empty} is empty: every text to embed needs at least one character", 2)
        eng = engine()
        with spinner("Embedding..."):
            result = run(eng.embed(EmbedRequest(texts=texts, model=model, is_query=query)))
        if result.truncated:  # on stderr, so that --json stays one document
            cut = ", ".join(str(i + 1) for i in result.truncated)
            model = result.model_used
            err.print(f"note: text {cut} is longer than {model} reads; only its beginning was embedded")
        if as_json:
            print_json(result)
            return
        out.print(f"{result.model_used}: {len(result.embeddings)} x {result.dimensions}", style="dim")
        for text, vector in zip(texts, result.embeddings, strict=True):
            head = ", ".join(f"{v:+.4f}" for v in vector[:6])
            out.print(escape(f"{text[:40]!r:44} [{head}, ...]"))

    @app.command()
    @handle_errors
    def rerank(
        query: Annotated[str, typer.Argument(help="the query; - reads stdin")],
        documents: Annotated[list[str], typer.Argument(help="documents to order")],
        model: ModelOpt = None,
        top_n: Annotated[int | None, typer.Option("--top-n", min=1, help="keep the best N")] = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Order documents by relevance to a query (- reads the query from stdin)."""
        query = from_stdin(query, "query")
        eng = engine()
        with spinner("Ranking..."):
            result = run(
                eng.rerank(RerankRequest(query=query, documents=documents, model=model, top_n=top_n))
            )
        if as_json:
            print_json(result)
            return
        table = Table(header_style="bold", caption=f"{result.model_used} ({result.method})")
        for column in ("rank", "score", "index", "document"):
            table.add_column(column)
        for rank, doc in enumerate(result.ranked, start=1):
            table.add_row(str(rank), f"{doc.score:.4f}", str(doc.index), escape(doc.document))
        out.print(table)

    @app.command()
    @handle_errors
    def classify(
        text: Annotated[str, typer.Argument(help="the text to classify; - reads stdin")],
        labels: Annotated[
            list[str], typer.Option("--labels", "-l", help="labels: comma-separated, or the option repeated")
        ],
        model: ModelOpt = None,
        method: Annotated[str, typer.Option(help="auto, likelihood (LLM) or embedding")] = "auto",
        as_json: JsonOpt = False,
    ) -> None:
        """Zero-shot classification over the given labels (- reads the text from stdin)."""
        text = from_stdin(text, "text to classify")
        names: list[str] = []  # `-l a -l b` kept only b, and answered 1.000 for it
        for given in labels:
            some = split_csv(given)
            if len(some) != len(given.split(",")):  # "a," ran on "a" alone, at 100 %
                raise fail(f"--labels {given!r} has an empty label: separate the labels by single commas", 2)
            names += some
        if not names:
            raise fail("--labels needs at least one label", 2)
        if method not in ("auto", "likelihood", "embedding"):
            raise fail("--method must be auto, likelihood or embedding", 2)
        eng = engine()
        with spinner("Classifying..."):
            result = run(eng.classify(ClassifyRequest(text=text, labels=names, model=model, method=method)))  # type: ignore[arg-type]
        if as_json:
            print_json(result)
            return
        for item in result.results:
            bar = "█" * round(item.score * 30)
            out.print(escape(f"{item.label:>20}  {item.score:6.3f}  {bar}"))
        out.print(f"{result.model_used} ({result.method})", style="dim")

    @app.command()
    @handle_errors
    def tokenize(
        model: Annotated[str, typer.Argument(help="a local model")],
        text: Annotated[str, typer.Argument(help="text to tokenize; - reads stdin")],
        as_json: JsonOpt = False,
    ) -> None:
        """Token ids of a text under a local model's tokenizer (- reads it from stdin, as it is)."""
        result = run(engine().tokenize(model, from_stdin(text, "text to tokenize")))
        if as_json:
            print_json(result)
            return
        out.print(" ".join(str(t) for t in result.tokens))

    @app.command(context_settings={"ignore_unknown_options": True})  # "-1" is an id to refuse, not a flag
    @handle_errors
    def detokenize(
        model: Annotated[str, typer.Argument(help="a local model")],
        ids: Annotated[list[int], typer.Argument(help="token ids")],
        as_json: JsonOpt = False,
    ) -> None:
        """Text of token ids under a local model's tokenizer."""
        result = run(engine().detokenize(model, ids))
        if as_json:
            print_json(result)
            return
        out.print(result.text, markup=False)
