import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdit.errors import SDiTError
from sdit.prompts import open_prompts


def test_a_text_file_gives_one_prompt_a_line_stripped(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\r\n  a blue square \n\na star\n", encoding="utf-8")
    bank = open_prompts(str(path))
    items = list(bank)
    assert bank.num_items() == 4 == len(items)
    assert [i.caption for i in items] == ["a red circle", "a blue square", "", "a star"]
    assert [i.id for i in items] == ["prompt-0", "prompt-1", "prompt-2", "prompt-3"] and items[3].position == 3


def test_a_parquet_column_gives_its_rows(tmp_path):
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"caption": ["one", None, " two "], "other": [1, 2, 3]}), path)
    bank = open_prompts(str(path), column="caption")
    assert bank.num_items() == 3
    assert [i.caption for i in bank] == ["one", None, "two"]


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "absent.txt", "no such file"),
    (lambda d: pq.write_table(pa.table({"a": ["x"]}), d / "p.parquet") or d / "p.parquet", "no column 'text'"),
])
def test_what_is_not_a_bank_is_refused_in_one_line(tmp_path, make, message):
    with pytest.raises(SDiTError, match=message):
        open_prompts(str(make(tmp_path)))
