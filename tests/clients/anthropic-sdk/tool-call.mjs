// A forced tool call, then its result sent back with the full history, then the answer.
import { client, report, MODEL, WEATHER } from './common.mjs';

await report(async () => {
  const anthropic = client();
  const messages = [{ role: 'user', content: 'What is the weather in Paris?' }];
  const call = await anthropic.messages.create({
    model: MODEL,
    max_tokens: 128,
    tools: [WEATHER],
    tool_choice: { type: 'tool', name: 'get_weather', disable_parallel_tool_use: true },
    messages,
  });
  // Parallel calls are allowed: every one gets its result.
  const toolUses = call.content.filter((block) => block.type === 'tool_use');
  messages.push({ role: 'assistant', content: call.content });
  messages.push({
    role: 'user',
    content: toolUses.map((use) => ({ type: 'tool_result', tool_use_id: use.id, content: '18C' })),
  });
  const answer = await anthropic.messages.create({
    model: MODEL,
    max_tokens: 8,
    tools: [WEATHER],
    messages,
  });
  return { call, tool_uses: toolUses, answer };
});
