"""Blocks that are not plain text, as text a text-only model can read.

A session must never brick on content the model cannot use: Claude Code keeps
a pasted screenshot in every later turn, and a conversation begun in the cloud
carries server-tool history. So images become a short placeholder (unless the
model's config says `images = "reject"`), documents and search results are
inlined with their titles and sources (PDFs through pypdf, in a child
process: pdf.py), a tool search's `tool_reference` becomes a line naming the
tool, and the cloud's own blocks become short text or nothing. Only an
explicit `reject` refuses.

A PDF is read within caps (pages, characters, time, the child's memory) and
each request within a budget of characters and reading time; what passes a
cap is cut, with a line saying so, never refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import secrets
import threading
from collections import OrderedDict
from typing import Any

from pensieved.conversation.images import ImagePreparer, PreparedImage, prepare_image
from pensieved.conversation.pdf import (
    CUT_CHARS,
    CUT_ERROR,
    CUT_MEMORY,
    CUT_PAGES,
    CUT_TIME,
    PdfLimits,
    PdfText,
    read_pdf,
)
from pensieved.wire.errors import InvalidRequest
from pensieved.wire.protocol import (
    CompactionBlock,
    ContainerUploadBlock,
    CountTokensRequest,
    DocumentBlock,
    ImageBlock,
    InputMessage,
    McpToolResultBlock,
    McpToolUseBlock,
    SearchResultBlock,
    ServerToolResultBlock,
    ServerToolUseBlock,
    TextBlock,
    ThinkingBlock,
    ToolReferenceBlock,
    ToolResultBlock,
    ToolSearchToolResultBlock,
    ToolUseBlock,
)

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "[image omitted: this model cannot see images]"
# Where a vision model's image goes in the rendered prompt: private-use marks
# around a per-request nonce and the image's index. The chat template renders
# it as text; PromptBuilder cuts the prompt there and puts the image's tokens in.
IMAGE_OPEN = "\U000f2002"
IMAGE_CLOSE = "\U000f2003"


def image_mark(nonce: str, index: int) -> str:
    return f"{IMAGE_OPEN}{nonce}:{index}{IMAGE_CLOSE}"


def join_blocks(texts: list[str]) -> str:
    """A turn's blocks as one text: a line between two, none beside an image's mark.

    Vision templates put an image's tokens right against the text around them.
    """
    if not any(IMAGE_OPEN in text for text in texts):
        return "\n".join(texts)
    joined = ""
    for index, text in enumerate(texts):
        if index and not joined.endswith(IMAGE_CLOSE) and not text.startswith(IMAGE_OPEN):
            joined += "\n"
        joined += text
    return joined


# The caps on reading PDFs (docs/security.md). The API itself takes at most
# 100 pages. The characters are a fixed bound, as the model's context is not
# known here: a million characters is about 250k tokens, more than any
# local model's context holds (a longer prompt is then refused as too long,
# with the count Claude Code compacts on), and about a second of tokenizing.
MAX_PDF_PAGES = 100
MAX_DOCUMENT_CHARS = 1_000_000  # of one PDF, and of all the PDFs of one request
PDF_SECONDS = 20.0  # to read one PDF
REQUEST_PDF_SECONDS = 60.0  # to read all the PDFs of one request
PDF_MEMORY_BYTES = 768 * 1024**2  # the reading child's address space


class BlockText:
    """Renders one request's non-text blocks; `images` is the model's "placeholder" or "reject".

    One instance per request: it keeps that request's budget of PDF text and time.
    """

    def __init__(
        self, model_name: str, images: str = "placeholder", vision: ImagePreparer | None = None
    ) -> None:
        self._model_name = model_name
        self._images = images
        self._vision = vision
        # A vision model's images, in the order they stand, each where its mark is.
        self.images: list[PreparedImage] = []
        # Unguessable, so that no client text can stand for an image (see `image_mark`).
        self.nonce = secrets.token_hex(8)
        self._chars_left = MAX_DOCUMENT_CHARS
        self._seconds_left = REQUEST_PDF_SECONDS

    def text(self, block: Any, where: str) -> str:
        """`block` as text for the prompt; "" when it is better left out."""
        if isinstance(block, TextBlock):
            return block.text
        if isinstance(block, ImageBlock):
            return self.image(where, block.source)
        if isinstance(block, DocumentBlock):
            return self._document(block.source, block.title, block.context, where)
        if isinstance(block, SearchResultBlock):
            body = "\n".join(part.text for part in block.content)
            return f"[search result: {block.title}]\nSource: {block.source}\n{body}".rstrip()
        if isinstance(block, ToolReferenceBlock):
            return f"[tool available: {block.tool_name}]"
        return self._cloud(block)

    def image(self, where: str, source: Any = None) -> str:
        """A placeholder for a text model; for a vision model, a mark where the image goes."""
        if self._vision is not None:
            self.images.append(prepare_image(source, where, self._vision))
            return image_mark(self.nonce, len(self.images) - 1)
        if self._images == "reject":
            raise InvalidRequest(
                f"{where}: model {self._model_name!r} is text-only and does not accept image input"
            )
        return IMAGE_PLACEHOLDER

    def parts(self, parts: str | list[Any], where: str) -> str:
        """A tool result's content (a string or blocks) as one text."""
        if isinstance(parts, str):
            return parts
        texts = (self.text(part, f"{where}.content.{i}") for i, part in enumerate(parts))
        return join_blocks([text for text in texts if text])

    def _document(self, source: Any, title: str | None, context: str | None, where: str) -> str:
        head = f"[document: {title}]" if title else "[document]"
        body = self._document_body(source if isinstance(source, dict) else {}, where)
        return "\n".join(part for part in (head, context, body) if part)

    def _document_body(self, source: dict[str, Any], where: str) -> str:
        kind = source.get("type")
        data = source.get("data")
        if kind == "text" and isinstance(data, str):
            return data
        if kind == "content":
            content = source.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "\n".join(self._content_part(part, where) for part in content)
        if kind == "base64" and isinstance(data, str):
            media = source.get("media_type", "")
            if media == "application/pdf":
                return self._pdf(data)
            if isinstance(media, str) and media.startswith("text/"):
                try:
                    return base64.b64decode(data).decode("utf-8", errors="replace")
                except (binascii.Error, ValueError):
                    return "[document omitted: its base64 data is not valid]"
        if kind == "url":
            # No route fetches URLs from request data (local-server security).
            return f"[document omitted: {source.get('url', '')} is a URL; this server fetches none]"
        if kind == "file":
            return (
                "[document omitted: it is in Anthropic's Files API, which this server cannot read]"
            )
        return f"[document omitted: a {kind!r} source is not supported]"

    def _pdf(self, data: str) -> str:
        if self._chars_left <= 0:
            return (
                "[PDF omitted: the documents before it already fill this request's "
                f"{MAX_DOCUMENT_CHARS:,} characters]"
            )
        if self._seconds_left <= 0:
            return (
                "[PDF omitted: reading the PDFs before it already took this request's "
                f"{REQUEST_PDF_SECONDS:g} seconds]"
            )
        pdf, fresh = pdf_text(data, min(PDF_SECONDS, self._seconds_left))
        if fresh:
            self._seconds_left -= pdf.seconds
        if not pdf.readable:
            return "[PDF omitted: its text could not be extracted]"
        text = "\n\n".join(pdf.pages)
        cut = pdf.cut
        if len(text) > self._chars_left:
            text, cut = text[: self._chars_left], CUT_CHARS
        self._chars_left -= len(text)
        unread = f"[PDF: {pdf.unreadable} of its pages could not be read]" if pdf.unreadable else ""
        if cut is None and not unread:
            return text or "[PDF omitted: it holds no text, only images]"
        notes = (text, unread, _cut_line(pdf, cut) if cut is not None else "")
        return "\n".join(part for part in notes if part)

    def _content_part(self, part: Any, where: str) -> str:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            return self.image(where, part.get("source"))
        text = part.get("text") if isinstance(part, dict) else None
        return text if isinstance(text, str) else ""

    def _cloud(self, block: Any) -> str:
        """History only the cloud produces (server tools, MCP, compaction) as short text."""
        if isinstance(block, ServerToolUseBlock):
            return f"[server tool call {block.name}: {_json(block.input)}]"
        if isinstance(block, ServerToolResultBlock):
            tag = type(block).__struct_config__.tag
            return self._server_result(str(tag), block.content)
        if isinstance(block, McpToolUseBlock):
            server = f"{block.server_name}." if block.server_name else ""
            return f"[MCP tool call {server}{block.name}: {_json(block.input)}]"
        if isinstance(block, McpToolResultBlock):
            body = self.parts(block.content, "mcp_tool_result")
            return f"[MCP tool {'error' if block.is_error else 'result'}]\n{body}".rstrip()
        if isinstance(block, ContainerUploadBlock):
            return f"[file {block.file_id} uploaded to the code execution container]"
        if isinstance(block, CompactionBlock):
            # The cloud's summary of everything before it: the model needs it.
            return block.content or ""
        return ""  # redacted thinking and anything else: nothing the model can use

    def _server_result(self, kind: str, content: Any) -> str:
        name = kind.removesuffix("_tool_result").replace("_", " ")
        if isinstance(content, list):  # web search: a list of results
            lines = [
                f"- {item.get('title', '')} ({item.get('url', '')})"
                for item in content
                if isinstance(item, dict)
            ]
            return "\n".join([f"[{name} results]", *lines])
        if not isinstance(content, dict):
            return f"[{name} result]"
        if "error_code" in content:
            return f"[{name} failed: {content['error_code']}]"
        if content.get("type") == "web_fetch_result":
            document = content.get("content")
            source = document.get("source") if isinstance(document, dict) else None
            body = self._document_body(source, kind) if isinstance(source, dict) else ""
            return f"[{name} of {content.get('url', '')}]\n{body}".rstrip()
        if "tool_references" in content:
            return f"[tools available: {', '.join(_tool_names(content))}]"
        if "stdout" in content or "stderr" in content:
            parts = [f"[{name}: return code {content.get('return_code')}]"]
            parts += [str(content[key]) for key in ("stdout", "stderr") if content.get(key)]
            return "\n".join(parts)
        if isinstance(content.get("content"), str):  # a text editor's view
            return f"[{name}]\n{content['content']}"
        return f"[{name} result]"


def referenced_tools(messages: list[InputMessage]) -> set[str]:
    """Tools named by a tool search anywhere in the conversation (`tool_reference` blocks)."""
    names: set[str] = set()
    for msg in messages:
        for block in msg.content if isinstance(msg.content, list) else []:
            if isinstance(block, ToolResultBlock) and isinstance(block.content, list):
                names.update(
                    part.tool_name for part in block.content if isinstance(part, ToolReferenceBlock)
                )
            elif isinstance(block, ToolSearchToolResultBlock) and isinstance(block.content, dict):
                names.update(_tool_names(block.content))
    return names


def _tool_names(result: dict[str, Any]) -> list[str]:
    """The names in a cloud tool search's result (read loosely, as all cloud history)."""
    references = result.get("tool_references")
    return [
        ref["tool_name"]
        for ref in (references if isinstance(references, list) else [])
        if isinstance(ref, dict) and isinstance(ref.get("tool_name"), str)
    ]


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _cut_line(pdf: PdfText, cut: str) -> str:
    """The line that ends a PDF's text where a cap stopped reading it."""
    shown = f"{len(pdf.pages)} page{'s' if len(pdf.pages) != 1 else ''} with text"
    if cut == CUT_PAGES:
        return f"[PDF cut: only its first {MAX_PDF_PAGES} of {pdf.total_pages} pages are shown]"
    if cut == CUT_CHARS:
        return f"[PDF cut: only its first {MAX_DOCUMENT_CHARS:,} characters are shown]"
    if cut == CUT_TIME:
        return f"[PDF cut: reading it took more than {pdf.seconds:.0f} seconds; {shown} shown]"
    if cut == CUT_MEMORY:
        limit = PDF_MEMORY_BYTES // 1024**2
        return f"[PDF cut: reading it needed more than {limit} MB of memory; {shown} shown]"
    return f"[PDF cut: reading it failed part way; {shown} shown]"


def cheap_to_render(request: CountTokensRequest) -> bool:
    """Whether the request's blocks render in time linear in their size, with no extraction.

    Only such requests may be rendered on the event loop: a document (a
    PDF) or the cloud's blocks, whatever their size, go to a thread.
    """
    for msg in request.messages:
        if isinstance(msg.content, str):
            continue
        for block in msg.content:
            if isinstance(block, ToolResultBlock):
                parts = block.content
                if not isinstance(parts, str) and not all(
                    isinstance(part, _CHEAP_BLOCKS) for part in parts
                ):
                    return False
            elif not isinstance(block, _CHEAP_BLOCKS | ToolUseBlock | ThinkingBlock):
                return False
    return True


# Images are not: a vision model decodes them (off the event loop).
_CHEAP_BLOCKS = TextBlock | ToolReferenceBlock

# Every turn resends the whole conversation, PDFs included: read each once.
# Bounded by count and by the bytes of text held.
_PDF_CACHE_ENTRIES = 32
_PDF_CACHE_BYTES = 64 * 1024**2
_pdf_texts: OrderedDict[bytes, PdfText] = OrderedDict()
_pdf_held = 0
_pdf_lock = threading.Lock()  # prompts render on worker threads


def pdf_text(data: str, seconds: float = PDF_SECONDS) -> tuple[PdfText, bool]:
    """The text of a base64 PDF, read within the caps; and whether it was read now (not cached)."""
    global _pdf_held
    key = hashlib.sha256(data.encode()).digest()
    with _pdf_lock:
        if key in _pdf_texts:
            _pdf_texts.move_to_end(key)
            return _pdf_texts[key], False
    limits = PdfLimits(MAX_PDF_PAGES, MAX_DOCUMENT_CHARS, seconds, PDF_MEMORY_BYTES)
    pdf = read_pdf(data, limits)
    if pdf.cut is not None:
        log.info(
            "PDF read cut (%s) after %d pages with text, %.1f s",
            pdf.cut,
            len(pdf.pages),
            pdf.seconds,
        )
    if pdf.cut == CUT_ERROR and not pdf.pages:
        return pdf, True  # perhaps no process could be started: try again next time
    with _pdf_lock:
        if key not in _pdf_texts:
            _pdf_texts[key] = pdf
            _pdf_held += pdf.size
        while _pdf_texts and (len(_pdf_texts) > _PDF_CACHE_ENTRIES or _pdf_held > _PDF_CACHE_BYTES):
            _, dropped = _pdf_texts.popitem(last=False)
            _pdf_held -= dropped.size
    return pdf, True
