"""OpenAI's wire format as pydantic models, one module per API area (`common`, `chat`, `models`,
`conversations`, `fine_tunes`); new areas add their own module and are imported from it directly.

Design choices (they hold for every area):
- Requests are validated here and nowhere else: a value out of OpenAI's documented range fails validation,
  which the app reports as a 400 in OpenAI's error shape. Numbers that would make the sampler overflow are
  kept out by the same ranges, so no request can crash a decode step that other requests share.
- Unknown fields are ignored, as vLLM does, so clients that send newer OpenAI fields keep working. Known
  OpenAI features that this server does not implement are *refused* when set to a non-default value rather
  than silently ignored: a caller that asks for them would otherwise get something other than what it asked for.
- Booleans are strict (`"stream": "yes"` is an error, not true). Every string is checked to be valid Unicode:
  JSON may carry lone surrogates (`"\\ud800"`), which neither the tokenizer nor the database can encode.
- Responses are models too, so the OpenAPI schema documents them; streaming chunks use the same models.
"""

from mini_claude.server.protocol.chat import (
    GREEDY_BELOW,
    MAX_CHOICES,
    MAX_STOP_STRINGS,
    SMALLEST_TOP_P,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    LegacyLogprobs,
    OutputToolCall,
    ResponseFormat,
    SamplingRequest,
    SocketRequest,
    StreamOptions,
    TextPart,
    TokenIds,
    TokenLogprobInfo,
    Tool,
    ToolCall,
    TopLogprob,
    Usage,
)
from mini_claude.server.protocol.common import (
    INT64,
    ErrorDetail,
    ErrorResponse,
    HealthResponse,
    new_id,
    now,
)
from mini_claude.server.protocol.conversations import (
    ConversationDeleted,
    ConversationDetail,
    ConversationInfo,
    ConversationList,
    ConversationMessage,
)
from mini_claude.server.protocol.fine_tunes import (
    RENAMED,
    FineTuneError,
    FineTuneHyperparameters,
    FineTuneJob,
    FineTuneJobList,
    FineTuneRequest,
)
from mini_claude.server.protocol.models import (
    AdapterDetail,
    ModelCard,
    ModelDeleted,
    ModelDetail,
    ModelDetails,
    ModelList,
)
from mini_claude.text import Text

__all__ = [
    "GREEDY_BELOW",
    "INT64",
    "MAX_CHOICES",
    "MAX_STOP_STRINGS",
    "RENAMED",
    "SMALLEST_TOP_P",
    "AdapterDetail",
    "AssistantMessage",
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatMessage",
    "ChoiceLogprobs",
    "CompletionChoice",
    "CompletionRequest",
    "CompletionResponse",
    "ConversationDeleted",
    "ConversationDetail",
    "ConversationInfo",
    "ConversationList",
    "ConversationMessage",
    "ErrorDetail",
    "ErrorResponse",
    "FineTuneError",
    "FineTuneHyperparameters",
    "FineTuneJob",
    "FineTuneJobList",
    "FineTuneRequest",
    "HealthResponse",
    "LegacyLogprobs",
    "ModelCard",
    "ModelDeleted",
    "ModelDetail",
    "ModelDetails",
    "ModelList",
    "OutputToolCall",
    "ResponseFormat",
    "SamplingRequest",
    "SocketRequest",
    "StreamOptions",
    "Text",
    "TextPart",
    "TokenIds",
    "TokenLogprobInfo",
    "Tool",
    "ToolCall",
    "TopLogprob",
    "Usage",
    "new_id",
    "now",
]
