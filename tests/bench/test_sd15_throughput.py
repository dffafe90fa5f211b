"""The GPU peak table: dense bf16 data-sheet figures, matched on the exact names torch reports."""

import pytest

from pipeline.bench.sd15_throughput import format_throughput_table, sheet_peak

# torch.cuda.get_device_name of each card, and its dense (no 2:4 sparsity) bf16 tensor-core peak in TFLOP/s: half
# the "with sparsity" figure of NVIDIA's data sheets (H100 SXM 1,979, H100 PCIe 1,513, H200 1,979, A100 624,
# L40S 733).
NAMES = {
    "NVIDIA H100 80GB HBM3": 989.0,  # SXM5
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA L40S": 362.0,
}


@pytest.mark.parametrize("name, peak", NAMES.items())
def test_each_card_gets_its_own_data_sheet_peak(name, peak):
    assert sheet_peak(name) == peak


@pytest.mark.parametrize("name", ["NVIDIA H100 NVL", "NVIDIA H200 NVL", "NVIDIA L40", "NVIDIA L4", "NVIDIA H100",
                                  "H100", "NVIDIA GeForce RTX 4090", "cpu", ""])
def test_a_name_not_in_the_table_has_no_peak_never_a_near_match(name):
    assert sheet_peak(name) is None


def rows_of(sheet: float | None) -> dict:
    return {"device": "NVIDIA H200", "peak_tflops_sheet": sheet, "peak_tflops_matmul": 500.0,
            "teacher_dtype": "float16",
            "rows": [{"model": "SDiT-B/2", "resolution": 512, "batch": 32, "seconds": 0.5, "per_s": 2.0,
                      "peak_gb": 40.0, "tflops": 250.0}]}


def test_of_peak_is_against_the_sheet_and_absent_for_an_unknown_card():
    known = format_throughput_table(rows_of(989.0)).splitlines()[-1]
    assert "50.0%" in known and "25.3%" in known  # 250 of the 500 measured, of the 989 on the sheet
    unknown = format_throughput_table(rows_of(None))
    assert "50.0%" in unknown.splitlines()[-1] and "%  steps/s" not in unknown.splitlines()[-1]
    assert "data sheet's dense bf16 - TFLOP/s" in unknown
