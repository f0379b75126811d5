"""The model summary a run prints as training starts: the modules that hold parameters.

Lightning's RichModelSummary also lists every loss and metric object (none holds a parameter),
repeats the parameter counts the run logs, and reports "Total FLOPs: 0", which is false: FLOPs
are only counted for a model with an `example_input_array`, which this one does not carry.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichModelSummary as LightningRichModelSummary


class RichModelSummary(LightningRichModelSummary):
    """Lightning's RichModelSummary, showing name, type, parameters and mode of each module with
    parameters (the backbone frozen in eval mode, the head training)."""

    SHOWN = ("Name", "Type", "Params", "Mode")

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], *args: Any, **summarize_kwargs: Any) -> None:
        from rich import get_console
        from rich.table import Table

        columns = {name: values for name, values in summary_data}
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name in RichModelSummary.SHOWN:
            table.add_column(name, justify="right" if name == "Params" else "left", no_wrap=True)
        for row in zip(*(columns[name] for name in RichModelSummary.SHOWN), strict=True):
            if row[2].strip() != "0":
                table.add_row(*row)
        get_console().print(table)
