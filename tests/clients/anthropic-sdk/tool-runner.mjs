// beta.messages.toolRunner with its default options (on this SDK it runs over
// a message thread): a forced call, the tool runs, its result goes back, an answer.
import { betaTool } from '@anthropic-ai/sdk/helpers/beta/json-schema';
import { client, report, wire, MODEL, WEATHER } from './common.mjs';

await report(async () => {
  const calls = [];
  const getWeather = betaTool({
    name: WEATHER.name,
    description: WEATHER.description,
    inputSchema: WEATHER.input_schema,
    run: async (input) => {
      calls.push(input);
      return '18C and sunny';
    },
  });
  const runner = client().beta.messages.toolRunner({
    model: MODEL,
    max_tokens: 128,
    tools: [getWeather],
    tool_choice: { type: 'tool', name: WEATHER.name, disable_parallel_tool_use: true },
    messages: [{ role: 'user', content: 'What is the weather in Paris?' }],
  });
  const messages = [];
  for await (const message of runner) {
    messages.push({ id: message.id, stop_reason: message.stop_reason, content: message.content });
    if (messages.length === 1) {
      // The random test model never calls a tool by itself, so the first turn
      // forces the call and the later ones may not call any. Changing params
      // hands the history to the caller, so the reply goes back in with them.
      runner.setMessagesParams((params) => ({
        ...params,
        messages: [...params.messages, message],
        tool_choice: { type: 'none' },
      }));
    }
  }
  const final = await runner.done();
  return {
    messages,
    calls,
    final_id: final.id,
    requests: wire.map(({ body, status }) => ({
      status,
      thread: body.thread ?? null,
      messages: body.messages.length,
      has_tools: 'tools' in body,
      last_content: body.messages.at(-1)?.content,
    })),
  };
});
