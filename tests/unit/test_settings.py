import pytest

from dsvl_app.settings import parse_settings


def test_defaults_are_local_and_safe():
    s = parse_settings([], environ={})
    assert s.model == "auto" and s.device == "auto" and s.dtype == "auto"
    assert s.attn_implementation == "sdpa" and s.quantize is None
    assert s.server_name == "127.0.0.1" and s.share is False and s.auth is None
    assert s.limits.images_per_message >= 1 and s.limits.context_tokens is None


def test_environment_then_flags_win():
    env = {"DSVL_MODEL": "tiny", "DSVL_MAX_IMAGES": "2", "DSVL_SHARE": "true", "DSVL_AUTH": "ann:pw"}
    s = parse_settings([], environ=env)
    assert (s.model, s.limits.images_per_message, s.share, s.auth) == ("tiny", 2, True, ("ann", "pw"))
    s = parse_settings(["--model", "org/other", "--max-images", "3", "--max-upload-mb", "1.5"], environ=env)
    assert (s.model, s.limits.images_per_message) == ("org/other", 3)
    assert s.limits.upload_bytes == int(1.5 * 1024 * 1024)


def test_space_binds_all_interfaces():
    assert parse_settings([], environ={"SPACE_ID": "me/app"}).server_name == "0.0.0.0"
    assert parse_settings(["--host", "10.0.0.1"], environ={"SPACE_ID": "x"}).server_name == "10.0.0.1"


@pytest.mark.parametrize(
    "argv", [["--auth", "nopassword"], ["--dtype", "int3"], ["--max-images", "0"], ["--quantize", "int2"], ["--attn", "x"]]
)
def test_bad_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        parse_settings(argv, environ={})
    assert "error" in capsys.readouterr().err


def test_bad_environment_is_named(capsys):
    with pytest.raises(SystemExit):
        parse_settings([], environ={"DSVL_PORT": "eighty"})
    assert "DSVL_PORT" in capsys.readouterr().err


def test_share_is_a_plain_flag():
    assert parse_settings(["--share"], environ={}).share is True
    assert parse_settings(["--share", "false"], environ={}).share is False


def test_cache_size_and_idle_time():
    assert parse_settings([], environ={}).cache_mb is None  # a share of free memory, chosen at load
    assert parse_settings(["--cache-mb", "0"], environ={}).cache_mb == 0  # reuse off
    s = parse_settings(["--cache-idle-s", "60"], environ={"DSVL_CACHE_MB": "512"})
    assert (s.cache_mb, s.cache_idle_s) == (512, 60)
    assert parse_settings([], environ={"SPACES_ZERO_GPU": "true"}).zero_gpu


def test_negative_cache_size_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_settings(["--cache-mb", "-1"], environ={})
    assert "0 turns it off" in capsys.readouterr().err


def test_batch_is_one_knob_with_its_old_names():
    assert parse_settings([], environ={}).batch is None  # chosen at load: 8 on CUDA, 4 on CPU
    assert parse_settings(["--batch", "6"], environ={}).batch == 6
    assert parse_settings([], environ={"DSVL_BATCH": "3"}).batch == 3
    assert parse_settings(["--generations", "2"], environ={}).batch == 2  # old names still work
    assert parse_settings(["--concurrency", "5"], environ={}).batch == 5
    assert parse_settings([], environ={"DSVL_GENERATIONS": "2"}).batch == 2
    assert parse_settings(["--batch", "7"], environ={"DSVL_CONCURRENCY": "2"}).batch == 7  # the flag wins
    assert parse_settings([], environ={}).batch_decode == "auto"
    assert parse_settings(["--batch-decode", "rows"], environ={}).batch_decode == "rows"


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--batch-decode", "sometimes"], ["--generations", "-1"]])
def test_bad_batch_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        parse_settings(argv, environ={})
    assert "error" in capsys.readouterr().err


def test_replicas_and_a_ray_address():
    assert parse_settings([], environ={}).replicas is None  # the engine in this process; Ray is not imported
    assert parse_settings(["--replicas", "2"], environ={}).replicas == 2
    assert parse_settings([], environ={"DSVL_REPLICAS": "3"}).replicas == 3
    joined = parse_settings(["--ray-address", "ray://head:10001"], environ={})
    assert joined.ray_address == "ray://head:10001" and joined.replicas == 1  # joining a cluster means replicas
    assert parse_settings([], environ={"DSVL_RAY_ADDRESS": "auto", "DSVL_REPLICAS": "4"}).replicas == 4


@pytest.mark.parametrize("argv, environ", [(["--replicas", "0"], {}), (["--replicas", "2"], {"SPACES_ZERO_GPU": "1"})])
def test_bad_replica_settings_are_refused(argv, environ, capsys):
    with pytest.raises(SystemExit):
        parse_settings(argv, environ=environ)
    assert "error" in capsys.readouterr().err
