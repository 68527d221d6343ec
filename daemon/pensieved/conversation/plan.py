"""What a request generates: the plain data the engine runs, and the rules that decide it.

One entry point, `plan_generation(request, prompt, model)`: whether the prompt
fits, how many tokens the reply may take, the sampling where the request is
silent, which tools the output may call and under which grammar, and whether
it is a side request. The HTTP layer reads, renders and submits; every API
(the Messages API today) asks here what to generate, so the rules live once.
Pure: no MLX, no I/O; `model` is anything with the attributes below (the
loaded model, or for the fit check alone a model's front end, its tokenizer without its weights).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pensieved.conversation.constraints import GrammarCompiler, ThinkingBudget
from pensieved.conversation.content import ContentAssembler, ThinkingMarkers
from pensieved.conversation.grammar import OutputGrammar
from pensieved.conversation.images import PreparedImage
from pensieved.conversation.prompt import Prompt, PromptBuilder
from pensieved.conversation.toolcalls import GENERIC, ToolFormat
from pensieved.wire.errors import prompt_too_long
from pensieved.wire.protocol import (
    MessagesRequest,
    ThinkingEnabled,
    ToolChoiceAny,
    ToolChoiceTool,
)

# Below this many prompt tokens a request is a side request whatever it carries.
SIDE_PROMPT_TOKENS = 1024


@dataclass(frozen=True)
class Sampling:
    """One request's sampling; 1.0 / 0 / 0.0 / 1.0 turn top_p / top_k / min_p / the penalty off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class GenerationRequest:
    """What the engine runs for one request: token ids in, no MLX object."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling = Sampling()
    stop_sequences: tuple[str, ...] = ()
    # max_tokens was cut to fit the context: running out means the window ended.
    context_limited: bool = False
    grammar: OutputGrammar | None = None
    thinking: ThinkingBudget | None = None
    # The reply continues a prefilled assistant turn: its first token's
    # leading space is part of the text (a code prefill's indentation).
    keep_leading_space: bool = False
    # A side request (no tools shown, a small prompt, or a small-model tier):
    # its prompt-cache entry never evicts a main conversation's, and its
    # prefill waits while a main turn's runs.
    side: bool = False
    # A vision model's images, and where each one's run of tokens starts in `prompt`.
    images: tuple[PreparedImage, ...] = ()
    image_starts: tuple[int, ...] = ()


class Sized(Protocol):
    """A model as far as the fit check needs it."""

    @property
    def context_length(self) -> int: ...


class SamplingDefaults(Protocol):
    """What a model samples with where a request is silent (models/sampling.py)."""

    @property
    def temperature(self) -> float: ...
    @property
    def top_p(self) -> float: ...
    @property
    def top_k(self) -> int: ...
    @property
    def min_p(self) -> float: ...
    @property
    def repetition_penalty(self) -> float: ...


class Planned(Sized, Protocol):
    """A model as far as planning its output needs it (engine/loading.py's LoadedModel)."""

    @property
    def builder(self) -> PromptBuilder: ...
    @property
    def tokenizer(self) -> Any: ...
    @property
    def grammars(self) -> GrammarCompiler: ...
    @property
    def sampling(self) -> SamplingDefaults: ...


@dataclass(frozen=True)
class OutputPlan:
    """How a request's output is constrained and read back."""

    tools: list[dict[str, Any]]
    tool_format: ToolFormat | None
    forced: bool
    grammar: OutputGrammar | None
    thinking: ThinkingBudget | None
    thinking_markers: ThinkingMarkers | None
    thinking_open: bool
    single_call: bool

    def assembler(
        self, signer: Callable[[str], str], continues_text: bool = False
    ) -> ContentAssembler:
        grammar = self.grammar
        calls = grammar is not None and bool(grammar.tools)
        json_reply = grammar is not None and grammar.reply_schema is not None
        return ContentAssembler(
            tool_format=self.tool_format,
            tools=self.tools,
            thinking=self.thinking_markers,
            thinking_open=self.thinking_open,
            constrained=calls,
            single_call=self.single_call,
            # Where the grammar allows calls or nothing else (forced, or
            # calls instead of the JSON reply), words after them end the turn.
            calls_only=calls and (self.forced or json_reply),
            signer=signer,
            continues_text=continues_text,
        )


@dataclass(frozen=True)
class GenerationPlan:
    """A request's generation and how its output is read back."""

    generation: GenerationRequest
    output: OutputPlan

    @property
    def input_tokens(self) -> int:
        return len(self.generation.prompt)


def plan_generation(request: MessagesRequest, prompt: Prompt, model: Planned) -> GenerationPlan:
    """Everything the engine and the reply need to generate `request` on `model`.

    Raises the API's "prompt is too long" where the prompt leaves no room.
    Compiling a grammar can take milliseconds: call it off the event loop
    unless the request has no tools and no reply schema.
    """
    input_tokens = len(prompt.tokens)
    check_fits(prompt, model)
    # Claude Code asks for 64000; clamp to what fits, never reject.
    max_tokens = min(request.max_tokens, model.context_length - input_tokens)
    output = plan_output(request, prompt, model)
    generation = GenerationRequest(
        prompt=prompt.tokens,
        max_tokens=max_tokens,
        sampling=request_sampling(request, model.sampling),
        stop_sequences=tuple(request.stop_sequences or ()),
        context_limited=max_tokens < request.max_tokens,
        grammar=output.grammar,
        thinking=output.thinking,
        keep_leading_space=prompt.continues_assistant,
        side=is_side_request(request.model, prompt.tools, input_tokens),
        images=prompt.images,
        image_starts=prompt.image_starts,
    )
    return GenerationPlan(generation, output)


def needs_grammar(request: MessagesRequest, prompt: Prompt) -> bool:
    """Whether planning `request` may compile a grammar (tools shown, or a reply schema)."""
    return bool(prompt.tools) or reply_schema(request) is not None


def check_fits(prompt: Prompt, model: Sized) -> None:
    """Refuse a prompt that leaves no room for one token of reply."""
    if len(prompt.tokens) > model.context_length - 1:
        raise prompt_too_long(len(prompt.tokens), model.context_length - 1)


def request_sampling(request: MessagesRequest, defaults: SamplingDefaults) -> Sampling:
    """The request's sampling; what it leaves unset, the model's defaults."""

    def pick(asked: Any, default: Any) -> Any:
        return default if asked is None else asked

    return Sampling(
        temperature=pick(request.temperature, defaults.temperature),
        top_p=pick(request.top_p, defaults.top_p),
        top_k=pick(request.top_k, defaults.top_k),
        min_p=pick(request.min_p, defaults.min_p),
        repetition_penalty=pick(request.repetition_penalty, defaults.repetition_penalty),
    )


def reply_schema(request: MessagesRequest) -> dict[str, Any] | None:
    """The JSON schema the reply's text must follow (structured output), if any."""
    config = request.output_config
    output_format = config.format if config is not None and config.format else request.output_format
    return output_format.schema if output_format is not None else None


def plan_output(request: MessagesRequest, prompt: Prompt, model: Planned) -> OutputPlan:
    """Which tools the output may call, in what format, under which grammar."""
    choice = request.tool_choice
    tools = prompt.tools
    forced = isinstance(choice, ToolChoiceAny | ToolChoiceTool)
    if isinstance(choice, ToolChoiceTool):
        tools = [t for t in tools if t["function"]["name"] == choice.name]
    single = bool(getattr(choice, "disable_parallel_tool_use", False))
    tool_format = prompt.tool_format
    thinks = model.builder.has_thinking
    strict = {tool.name for tool in request.tools or () if tool.strict}
    # A prefilled reply is the client's own start, which a grammar for a
    # whole document cannot continue: it is left free.
    schema = None if forced or prompt.continues_assistant else reply_schema(request)
    # Calls under tool_choice auto are constrained once they open, where the
    # format's body is JSON. Text before them must be free, and llguidance
    # lets no special token through free text: a reasoning model's thinking
    # markers are written into the grammar, but its optional calls stay
    # unconstrained (and are parsed whole) unless a tool asks to be strict or
    # the reply must be JSON (then its calls are in the grammar, as any object).
    lazy = (
        tool_format is not None
        and tool_format.json_body
        and not tool_format.start_in_body
        and (
            not thinks or schema is not None or any(t["function"]["name"] in strict for t in tools)
        )
    )
    if forced:
        # Forced calls are written in the generic format, whatever the
        # template's own: the grammar guarantees it, so it parses.
        tool_format = GENERIC
    tokenizer = model.tokenizer
    markers = ThinkingMarkers(tokenizer.think_start, tokenizer.think_end) if thinks else None
    budget = None
    if thinks and isinstance(request.thinking, ThinkingEnabled):
        budget = ThinkingBudget(request.thinking.budget_tokens, prompt.thinking_open)
    called = tools if tool_format is not None and (forced or lazy) else []
    grammar = None
    if called or schema is not None:
        grammar = model.grammars.enforceable(
            OutputGrammar(
                tools=tuple(
                    (
                        t["function"]["name"],
                        # A reasoning model's calls are constrained only to strict tools.
                        json.dumps(t["function"]["parameters"])
                        if forced or not thinks or t["function"]["name"] in strict
                        else None,
                    )
                    for t in called
                ),
                forced=forced,
                parallel=not single,
                start=tool_format.start if called and tool_format else "",
                end=tool_format.end if called and tool_format else "",
                reply_schema=None if schema is None else json.dumps(schema),
                # Thinking stays free: the grammar starts where it ends.
                thinking=(markers.start, markers.end) if markers and not forced else None,
                thinking_open=prompt.thinking_open,
            ),
        )
    return OutputPlan(
        tools=tools,
        tool_format=tool_format,
        forced=forced,
        grammar=grammar,
        thinking=budget,
        thinking_markers=markers,
        thinking_open=prompt.thinking_open,
        single_call=single and (grammar is None or not grammar.tools),
    )


def small_tier(requested: str) -> bool:
    """Whether a client's `model` string names Claude's small tier (haiku)."""
    return "haiku" in requested.lower()


def is_side_request(requested: str, tools: list[Any], prompt_tokens: int) -> bool:
    """Whether a request is a side request, by what it carries, not by its text.

    A main conversation turn shows the model tools and carries a long
    prompt; a session title, a quick helper call or a small-tier request
    does not (see `GenerationRequest.side`).
    """
    return not tools or prompt_tokens < SIDE_PROMPT_TOKENS or small_tier(requested)
