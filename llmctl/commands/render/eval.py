"""What ``llmctl eval`` prints: the scoring progress with its ETA and the report."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from llmctl.commands.render import _Bar, notice, out


class ScoringEta:
    """Rate and time left while scoring, measured from the end of the first forward on: the first one
    carries the warm-up, and the windows of one batched forward arrive at once (rates taken across them
    are meaningless). Updates closer than ``burst`` seconds to the previous one, within ``settle`` seconds
    of the first, count as that first forward. ``now`` is passed in (monotonic seconds)."""

    def __init__(self, burst: float = 0.05, settle: float = 1.0) -> None:
        self.burst, self.settle = burst, settle
        self.first: float | None = None
        self.anchor = (0.0, 0)  # (time, tokens done) the rate is measured from
        self.last = 0.0
        self.settled = False

    def update(self, done: int, total: int, now: float) -> tuple[float, float] | None:
        """(tokens per second, seconds left), or None while there is nothing to measure yet."""
        if self.first is None:
            self.first, self.anchor, self.last = now, (now, done), now
            return None
        if not self.settled and now - self.last < self.burst and now - self.first < self.settle:
            self.anchor = (now, done)  # still the first forward's windows
        else:
            self.settled = True
        self.last = now
        t0, d0 = self.anchor
        if not self.settled or done <= d0 or now <= t0:
            return None
        rate = (done - d0) / (now - t0)
        return rate, (total - done) / rate


class _EvalProgress(_Bar):
    """One line per step of ``evaluate`` (tokenizing, loading each model, scoring, saving) on stderr, only on
    a terminal: a spinner and the time each step took; scoring has a bar, tokens fed, rate and ETA."""

    def __init__(self, enabled: bool) -> None:
        from rich.progress import BarColumn, SpinnerColumn, TextColumn, TimeElapsedColumn

        class ScoringBar(BarColumn):  # the other steps have no measure of how far they are
            def render(self, task: Any) -> Any:
                return super().render(task) if task.fields.get("bar") else Text("")

        super().__init__(
            enabled,
            SpinnerColumn(finished_text="[green]✓[/green]"),
            TextColumn("{task.description}"),
            ScoringBar(),
            TextColumn("{task.fields[count]}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[eta]}"),
        )
        self.what: str | None = None

    def update(self, e: Any) -> None:
        import time

        if e.what != self.what:
            self._finish()
            scoring = e.phase == "score"
            self.task = self.bar.add_task(e.what, total=e.total if scoring else None, count="", eta="", bar=scoring)
            self.what, self.eta = e.what, ScoringEta()
            if scoring:
                self.bar.update(self.task, count=f"0/{e.total:,} tokens", eta="ETA after the first forward")
            return
        if e.phase == "score":
            measured = self.eta.update(e.done, e.total, time.monotonic())
            eta = "ETA after the first forward"
            if measured is not None:
                rate, left = measured
                eta = f"{rate:,.0f} tok/s, ETA {int(left) // 60}:{int(left) % 60:02d}"
            self.bar.update(self.task, completed=e.done, count=f"{e.done:,}/{e.total:,} tokens", eta=eta)

    def _finish(self) -> None:
        if self.task is not None:
            self.bar.update(self.task, total=1, completed=1, eta="")

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self._finish()
        super().__exit__(*exc)


def eval_progress(enabled: bool = True) -> _EvalProgress:
    """A context manager yielding the progress callback for ``evaluate`` (None when stderr is not a
    terminal)."""
    return _EvalProgress(enabled)


def _documents(r: Any) -> str:
    n = f"{r.documents} document{'s' * (r.documents != 1)}"
    if r.documents_in_data <= r.documents:
        return n
    return f"{n} of {r.documents_in_data}" + (" scored" if r.protocol == "documents" else " read")


def eval_report(r: Any) -> None:
    con = out()
    settings = f"context {r.context}" + (f", stride {r.stride}" if r.stride is not None else "")
    con.print(
        f"[bold]{r.model}[/bold] on {r.data} ({_documents(r)}); protocol "
        f"{r.protocol} ({settings}), {r.windows} windows; {r.backend} backend, {r.device}"
    )
    table = Table(title="Perplexity", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("[bold]perplexity[/bold]", f"[bold]{r.perplexity:.4f} ± {r.stderr:.4f}[/bold]")
    table.add_row("mean nll (nats/token)", f"{r.nll:.5f}")
    if r.word_perplexity is not None:
        table.add_row("word perplexity", f"{r.word_perplexity:.4f} ({r.words:,} words)")
        table.add_row("byte perplexity", f"{r.byte_perplexity:.5f} ({r.bytes:,} bytes)")
        table.add_row("bits per byte", f"{r.bits_per_byte:.5f}")
    table.add_row("tokens scored", f"{r.tokens:,}")
    table.add_row("tokens through the model", f"{r.tokens_fed:,}")
    table.add_row("speed", f"{r.tokens_per_second:,.1f} tok/s ({r.scored_per_second:,.1f} scored tok/s)")
    table.add_row("elapsed", f"{r.elapsed_s:.2f} s (+ {r.load_s:.2f} s loading)")
    con.print(table)
    if r.kl is not None:
        k = r.kl
        kl = Table(title=f"Against the baseline {r.baseline}", title_justify="left")
        kl.add_column("measure")
        kl.add_column("value", justify="right")
        kl.add_row("[bold]mean KL divergence[/bold]", f"[bold]{k.mean:.6f} ± {k.mean_stderr:.6f}[/bold]")
        kl.add_row("median / 90% / 99% / max KLD", f"{k.median:.6f} / {k.p90:.6f} / {k.p99:.6f} / {k.maximum:.6f}")
        kl.add_row("PPL(base)", f"{k.ppl_base:.4f} ± {k.ppl_base_stderr:.4f}")
        kl.add_row("PPL − PPL(base)", f"{k.delta_ppl:+.4f} ± {k.delta_ppl_stderr:.4f}")
        kl.add_row("ln(PPL / PPL(base))", f"{k.ln_ppl_ratio:+.6f} ± {k.ln_ppl_ratio_stderr:.6f}")
        kl.add_row("same top-1 token", f"{100 * k.same_top:.3f} ± {100 * k.same_top_stderr:.3f} %")
        kl.add_row("mean Δp (correct token)", f"{100 * k.delta_p_mean:+.3f} ± {100 * k.delta_p_stderr:.3f} %")
        kl.add_row("median Δp / RMS Δp", f"{100 * k.delta_p_median:+.3f} % / {100 * k.delta_p_rms:.3f} %")
        con.print(kl)
    if r.saved_logits:
        con.print(f"saved the top-k log-probabilities to {r.saved_logits} (use it with --baseline-logits)")
    for note in r.notes:
        notice(f"note: {note}")
