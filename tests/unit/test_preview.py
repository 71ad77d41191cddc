import torch
from transformers import DeepseekVLImageProcessor, DeepseekVLProcessor

from dsvl_app import conversation as conv
from dsvl_app.preview import image_views, normalisations


def encoded(processor, paths):
    prompt = conv.template_messages(
        [conv.Turn("user", tuple(conv.ImageRef(p) for p in paths) + ("what?",))],
        {p: __import__("PIL.Image").Image.open(p).convert("RGB") for p in paths},
    )
    return conv.encode(processor, prompt)


def test_views_are_the_processor_tensors_and_round_trip(handle, make_image):
    paths = [make_image("a.png", colour=(200, 30, 60), size=(320, 200)), make_image("b.png", colour=(10, 220, 90), size=(90, 300))]
    inputs = encoded(handle.processor, paths)
    views = image_views(handle.processor, inputs, ["a.png", "b.png"], [(320, 200), (90, 300)])
    assert [v.caption for v in views] == ["Image 1 · a.png · 320×200", "Image 2 · b.png · 90×300"]
    assert views[0].low_res.size == (384, 384) and views[0].high_res.size == (1024, 1024)
    low, high = normalisations(handle.processor)
    for i, view in enumerate(views):
        # Re-normalising a preview reproduces the processor's tensor (to within 8-bit rounding).
        assert torch.allclose(low.to_tensor(view.low_res), inputs["pixel_values"][i], atol=0.5 / 255 / min(low.std) + 1e-4)
        assert torch.allclose(high.to_tensor(view.high_res), inputs["high_res_pixel_values"][i], atol=0.5 / 255 / min(high.std) + 1e-4)
    # The padding the processor added is visible: a wide image gets bands above and below.
    assert views[0].low_res.getpixel((192, 5)) != views[0].low_res.getpixel((192, 192))


def test_low_res_only_for_the_1_3b_family(handle, make_image):
    processor = DeepseekVLProcessor(image_processor=DeepseekVLImageProcessor(), tokenizer=handle.processor.tokenizer,
                                    chat_template=handle.processor.chat_template)
    inputs = encoded(processor, [make_image("c.png")])
    assert "high_res_pixel_values" not in inputs
    (view,) = image_views(processor, inputs, ["c.png"], [(64, 48)])
    assert view.high_res is None and view.low_res.size == (384, 384)
    assert normalisations(processor)[1] is None
