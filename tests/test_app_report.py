"""gora.app.run.report: the rank table (layer x module type)."""

from __future__ import annotations

from gora.app.run.report import format_rank_table, rank_table


def test_rank_table_layers_by_module_type():
    """Protects the report's table: rows are layers in numeric order, columns module types, '-' where absent."""
    ranks = {"m.layers.10.q": 3, "m.layers.2.q": 5, "m.layers.2.v": 9, "m.pooler.dense": 7}
    table = rank_table(ranks)
    assert table.layers == ["2", "10", "m.pooler"] and table.types == ["q", "v", "dense"]
    assert table.cells == [[5, 9, None], [3, None, None], [None, None, 7]]
    text = format_rank_table(table)
    assert text.splitlines()[-1].split() == ["mean", "4.0", "9.0", "7.0"]
