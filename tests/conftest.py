from __future__ import annotations

import os
import subprocess
import sys

import warnings

import pytest
import torch

from longcat_lora.testing.fixtures import write_native_lora
from longcat_lora.model.naming import DitDims

# Full structure (48 blocks, every module type), small widths so the suite stays fast.
DIMS = DitDims(hidden=64, ffn=176, adaln=32, final_out=16, depth=48)


def cli(*args: str, check: int | None = 0) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess."""
    p = subprocess.run([sys.executable, "-m", "longcat_lora", *map(str, args)], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"})
    assert "Warning" not in p.stderr, p.stderr
    if check is not None:
        assert p.returncode == check, f"exit {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    return p


@pytest.fixture
def native(tmp_path):
    """Factory: write a full-structure native LoRA and return its path."""

    def make(layout: str = "refinement", name: str | None = None, **kw) -> str:
        kw.setdefault("dims", DIMS)
        kw.setdefault("rank", 4)
        kw.setdefault("dtype", torch.float32)
        path = tmp_path / (name or f"{layout}.safetensors")
        return write_native_lora(str(path), layout, **kw)

    return make


# ----------------------------------------------------------------------------- test tiers
# `make test` runs every test (CI); `make check` runs `pytest -m "not slow"`, the fast tier (docs/contributing.md:
# its time, what it leaves out, when to run which). The tiers are chosen here, in one place, so that test files
# need no markers. `slow`: every hypothesis test, and the tests named in SLOW (file -> test names, or "*" for the
# whole file). ONE_CASE: parametrized tests whose first case stays in the fast tier (one path through the code)
# and whose other cases are slow. The fast tier must stay under 90 s on the 2-core machine and exercise every
# module (docs/contributing.md says how that was measured); put a new test that takes more than about a
# second here.

SLOW = {
    "test_algebra_extract.py": [
        "test_randomized_svd_on_a_large_block",
        "test_energy_and_max_error_pick_the_smallest_qualifying_rank",
        "test_mismatched_checkpoints_exit_2_with_one_line_and_write_nothing",
        "test_existing_output_is_refused_then_replaced_with_overwrite",
        "test_extract_to_peft_loads_in_real_peft",
        "test_int8_base_is_read_as_int8_times_scale",
    ],
    "test_algebra_plot.py": [
        "test_plot_writes_a_png_of_the_expected_size",
        "test_norms_and_spectra_equal_the_materialised_change",
        "test_modules_filter_and_unknown_kind",
        "test_resize_plot",
    ],
    "test_algebra_resize.py": [
        "test_full_rank_resize_reproduces_the_weight_change",
        "test_bf16_resize_is_optimal_on_both_paths_well_and_ill_conditioned",
        "test_rank_k_is_the_eckart_young_optimum_of_each_up_block_and_the_report_is_true",
        "test_reported_error_includes_the_output_dtype_rounding",
        "test_energy_and_max_error_pick_the_smallest_qualifying_rank_per_up_block",
        "test_resized_outputs_load_in_real_peft_and_diffusers",
        "test_resize_cli_json_and_format",
        "test_exact_combine_is_the_sum_of_weight_changes",
        "test_compressed_combine_is_the_optimum_of_the_sum",
        "test_dense_svd_randomized_recovers_a_planted_low_rank_matrix",
        "test_wide_and_rank_deficient_blocks_take_the_qr_path",
        "test_nonfinite_input_and_fp16_overflow_exit_2_naming_the_module",
    ],
    "test_avatar.py": [
        "test_apply_on_avatar_dit_matches_official",
    ],
    "test_bad_input.py": [
        "test_each_bad_input_class_is_refused_cleanly",
        "test_inspect_refuses_bad_input_too",
        "test_nan_weights_refused_unless_allowed",
        "test_unmapped_modules_refused_or_skipped_with_a_list",
    ],
    "test_cli.py": [
        "test_inspect_every_format_and_truncated_alpha_note",
        "test_verify_exit_codes_and_worst_location",
        "test_demo_runs",
    ],
    "test_docs.py": [
        "test_example_runs",
    ],
    "test_exactness.py": [
        "test_int_alpha_truncation_is_what_fastvideo_does",
        "test_round_trip_non_integer_alpha_is_weight_change_exact",
        "test_cli_other_dims_rank_dtype_alpha",
    ],
    "test_faults.py": ["*"],
    "test_formats.py": [
        "test_a_new_format_is_one_module_and_one_registration",
        "test_peft_directory_loads_in_real_peft",
        "test_diffusers_file_loads_in_real_diffusers",
        "test_round_trip_bit_exact",
        "test_verify_across_formats_detects_perturbation",
        "test_end_to_end_real_peft_and_diffusers_on_reference_dit",
    ],
    "test_hostile.py": [
        "test_peft_itself_gives_the_scales_we_read",
        "test_pattern_refusals_are_clean_and_bounded",
        "test_header_with_200k_tensors_answers",
        "test_a_newline_in_a_name_never_reaches_the_log",
    ],
    "test_int8_runtime.py": [
        "test_project_quantizer_builds_the_reference_int8_dit",
        "test_apply_on_int8_model_matches_official",
        "test_two_adapters_on_int8_model",
        "test_apply_on_split_int8_model",
        "test_fuse_applied_adapters_by_name_into_int8_and_unmerge_bit_exact",
    ],
    "test_merge.py": [
        "test_merged_checkpoint_reproduces_apply_lora",
        "test_bad_bases_fail_cleanly",
        "test_unmapped_lora_modules",
        "test_cuda_device_without_cuda_is_a_clean_error",
        "test_device_stages_on_cpu_agree_with_the_cpu_path_and_the_reference",
        "test_signal_mid_pipeline_stops_promptly_and_leaves_nothing",
        "test_device_auto_and_errors_name_parameters",
    ],
    "test_merge_int8.py": ["*"],
    "test_merge_wanvideo.py": [
        "test_repack_lands_every_official_tensor_once_under_the_wrappers_name",
        "test_fp8_ties_are_decided_by_the_exact_sum",
        "test_fp8_bytes_do_not_depend_on_chunks_workers_or_stages",
        "test_fp8_reported_errors_are_the_true_ones",
        "test_comfyui_prefixed_checkpoint_is_merged_under_its_prefix",
        "test_dequantized_fp8_checkpoint_is_a_plain_one",
        "test_sharded_fp8_scales_in_other_shards_than_their_weights",
        "test_repack_fp8_e4m3fn_scaled",
        "test_repack_int8_folder",
        "test_bad_input_exits_2_with_one_line_and_writes_nothing",
        "test_sigterm_and_sigkill_mid_write",
        "test_disk_full_and_input_cut_while_read_name_the_file",
        "test_repack_output_is_a_file_and_overwrite_replaces_only_a_file",
    ],
    "test_merge_workers.py": [
        "test_bytes_do_not_depend_on_the_workers_and_chunks_are_shared",
    ],
    "test_regressions.py": [
        "test_merge_output_dtypes_and_values",
        "test_out_equal_to_input_is_refused_by_resolved_path",
        "test_peft_alpha_pattern_for_a_default_rank_module",
        "test_verify_reports_the_reference_relative_error",
        "test_merge_strength_that_overflows_is_a_clean_refusal",
    ],
    "test_reproducible.py": ["*"],
    "test_review_exact.py": [  # the CLI cases (subprocesses); the ExactMerge cases stay fast
        "test_merge_refuses_rows_that_do_not_split_over_split_layers",
        "test_merge_dtype_rounds_untouched_tensors_once_and_refuses_their_overflow",
        "test_a_float64_fp8_scale_whose_products_are_not_exact_is_refused",
    ],
    "test_runtime.py": [
        "test_parity_all_paths",
        "test_two_adapters_at_once_and_strengths",
        "test_remove_restores_outputs_and_state_dict_exactly",
        "test_merge_is_fp32_cast_once_and_unmerge_bit_exact",
        "test_bf16_parity_figure",
    ],
    "test_runtime_switching.py": [
        "test_read_once_then_switch_like_the_official_demo",
        "test_disabled_adapters_cost_nothing_in_the_forward",
        "test_strength_per_name_and_remove_by_name",
        "test_merge_by_names_then_unmerge_bit_exact",
        "test_merge_by_name_is_undone_by_remove_all",
        "test_fuse_by_name_on_bf16_is_fp32_cast_once",
    ],
    "test_wild_loras.py": [
        "test_each_producer_form_is_read_exactly_and_converts_to_every_format",
        "test_wanvideo_output_is_the_wrappers_form",
        "test_unknown_modules_are_refused_by_merge_apply_and_the_algebra",
        "test_wild_bad_inputs_are_one_line_and_exit_2",
        "test_inspect_names_the_form_the_naming_and_the_producer",
    ],
}
ONE_CASE = {
    "test_algebra_extract.py": [
        "test_bad_options_exit_2_with_one_line",
    ],
    "test_bad_input.py": [
        "test_a_module_of_no_longcat_model_is_never_written",
    ],
    "test_exactness.py": [
        "test_fastvideo_matches_official_under_fastvideo_loader",
        "test_round_trip_native_fastvideo_native_bit_exact",
    ],
    "test_hostile.py": [
        "test_deep_nesting_through_the_real_cli",
    ],
    "test_lazy.py": [
        "test_convert_reads_each_big_tensor_a_known_number_of_times",
    ],
    "test_merge_wanvideo.py": [
        "test_merge_into_fp8_scaled_checkpoint",
    ],
}


def _tier_names(table: dict[str, list[str]]) -> set[str]:
    return {f"{file}::{test}" for file, tests in table.items() for test in tests}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    slow_tests, one_case = _tier_names(SLOW), _tier_names(ONE_CASE)
    seen_files, seen_tests, first = set(), set(), {}
    for item in items:
        file = item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
        test = f"{file}::{getattr(item, 'originalname', item.name)}"
        seen_files.add(file)
        seen_tests.add(test)
        slow = (f"{file}::*" in slow_tests or test in slow_tests
                or getattr(getattr(item, "function", None), "is_hypothesis_test", False))
        if test in one_case:
            slow = slow or first.setdefault(test, item.nodeid) != item.nodeid
        if slow:
            item.add_marker(pytest.mark.slow)
    every = {f for f in os.listdir(os.path.dirname(__file__)) if f.startswith("test_") and f.endswith(".py")}
    if every <= seen_files:  # a whole-suite run: say when the tables name tests that no longer exist
        gone = sorted(t for t in slow_tests | one_case
                      if t not in seen_tests and not (t.endswith("::*") and t.split("::")[0] in every))
        if gone:
            warnings.warn(pytest.PytestWarning(f"tests/conftest.py's tier tables name tests that do not exist: {gone}"))
