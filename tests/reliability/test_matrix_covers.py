"""The reliability matrix covers every command, with at least 60 cases run as their own processes."""

import test_caching_matrix
import test_output_matrix
import test_training_matrix


def test_the_matrix_covers_every_command_with_at_least_60_cases():
    cases = test_caching_matrix.CASES + test_training_matrix.CASES + test_output_matrix.CASES
    assert len(cases) >= 60
    assert len({c.id for c in cases}) == len(cases), "two cases share an id"
    assert {c.command for c in cases} == {"cache_latents", "cache_text_encoder_outputs", "hv_train_network", "merge_lora",
                                          "hv_generate_video", "convert_lora", "lora_post_hoc_ema", "plan", "lora_info",
                                          "demo.__main__"}
    kinds = {"a file-size limit": any(c.file_size_limit for c in cases), "a read-only folder": any(c.read_only for c in cases),
             "files that must keep their bytes": any(c.keep for c in cases), "runs that must succeed": any(c.error is None for c in cases)}
    assert all(kinds.values()), kinds
