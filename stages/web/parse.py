"""Parse: one input file in, its documents out (HTML page -> 1 record, records file -> N).

The first stage of the web pipeline, so every discovered file gets exactly one
parent row and every document one child row, whatever the format. HTML goes
through `html_convert`, parquet / jsonl through `reader`; their rules decide
under the policy block `parse`. Each document also gets `text`, its text
items joined by blank lines, which the text stages score.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import Field

from weft.schemas.web import WEB_DOC_FIELDS, items_text
from weft.stages.base import Outcome, Resources, RunContext, Stage, StageConfig
from weft.stages.web.html_convert import HtmlConvertConfig, HtmlConvertStage
from weft.stages.web.reader import ReadRecordsConfig, ReadRecordsStage, file_format

HTML_SUFFIXES = (".html", ".htm", ".xhtml")
DOC_FIELDS = [
    pa.field("item_id", pa.string()), pa.field("parent_id", pa.string()),
    pa.field("item_kind", pa.string()), *WEB_DOC_FIELDS, pa.field("text", pa.string())]


class ParseConfig(StageConfig):
    """How HTML pages and record files are read."""

    resources: Resources = Field(default_factory=lambda: Resources(cpus=1, batch_size=8))
    html: HtmlConvertConfig = Field(default_factory=HtmlConvertConfig)
    records: ReadRecordsConfig = Field(default_factory=ReadRecordsConfig)


class _Html(HtmlConvertStage):
    name = "parse"  # decide under the policy block of the stage the ledger names


class _Records(ReadRecordsStage):
    name = "parse"


class ParseStage(Stage):
    """Expand each input file into its documents."""

    name: ClassVar[str] = "parse"
    version: ClassVar[str] = "1"
    kind = "expand"
    item_kind: ClassVar[str] = "web_doc"
    Config: ClassVar[type[StageConfig]] = ParseConfig
    input_columns: ClassVar[tuple[str, ...]] = ("path",)
    output_fields: ClassVar[list[pa.Field]] = DOC_FIELDS
    heavy_columns: ClassVar[tuple[str, ...]] = ("items", "text")
    config: ParseConfig

    def __init__(self, config: ParseConfig | None, ctx: RunContext) -> None:
        super().__init__(config, ctx)
        self._html = _Html(self.config.html, ctx)
        self._records = _Records(self.config.records, ctx)

    def process(self, row: dict[str, Any]) -> list[Outcome]:
        path = Path(row["path"])
        if path.suffix.lower() in HTML_SUFFIXES:
            (outcome,) = self._html.process(row)
            outcome.entry.parent_id = row["item_id"]
            outcome.row = {"item_id": outcome.row["doc_id"], "parent_id": row["item_id"],
                           "source_id": row["source_id"], "item_kind": self.item_kind,
                           "path": str(path), **outcome.row}
            outcomes = [outcome]
        else:  # parquet / jsonl, or ItemError(unsupported_format)
            file_format(path)
            outcomes = self._records.process(row)
        for outcome in outcomes:
            outcome.row["text"] = items_text(outcome.row.get("items"))
        return outcomes
