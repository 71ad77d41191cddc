"""The app as an MCP tool (--mcp): a real MCP client lists the chat tool and asks it about an image."""

import asyncio
import base64
from pathlib import Path

import httpx
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from dsvl_app.settings import parse_settings
from tests.conftest import serve

pytestmark = pytest.mark.api

EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"


async def _list_and_call(url: str):
    async with streamable_http_client(url) as (read, write, _), ClientSession(read, write) as session:
        await session.initialize()
        tools = (await session.list_tools()).tools
        chat = next(t for t in tools if t.name.endswith("chat"))
        image = "data:image/png;base64," + base64.b64encode((EXAMPLES / "red_circle.png").read_bytes()).decode()
        result = await session.call_tool(chat.name, {
            "message": {"text": "What colour is the shape?", "files": [image]}, "history": [],
            "max_new_tokens": 32, "temperature": 0, "top_p": 1, "repetition_penalty": 1, "seed": 0})
        return chat, result


def test_an_mcp_client_lists_the_chat_tool_and_calls_it_with_an_image(handle):
    settings = parse_settings(["--model", "tiny", "--mcp"], environ={})
    with serve(settings, handle) as served:
        url = served[1]
        tool, result = asyncio.run(_list_and_call(url + "gradio_api/mcp/"))
        metrics = httpx.get(url + "metrics").text  # the reply is counted as MCP's, not /chat's
    assert 'dsvl_requests_finished_total{reason="stop",surface="mcp"} 1.0' in metrics
    assert 'dsvl_requests_finished_total{reason="stop",surface="chat"} 0.0' in metrics
    assert "image" in tool.description and "data: URL" in tool.description
    assert "files" in str(tool.inputSchema["properties"]["message"])
    assert not result.isError, result
    assert "The shape is red." in " ".join(part.text for part in result.content if part.type == "text")
