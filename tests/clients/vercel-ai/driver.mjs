// The Vercel AI SDK (`ai` + `@ai-sdk/anthropic`), unmodified: `node driver.mjs SCENARIO`
// prints one JSON line of what it saw. ANTHROPIC_BASE_URL and ANTHROPIC_API_KEY
// say where the daemon is, as for any Anthropic client.
import { createAnthropic } from '@ai-sdk/anthropic';
import { APICallError, Output, generateText, jsonSchema, stepCountIs, streamText, tool } from 'ai';
import { z } from 'zod';

const MODEL = process.env.PENSIEVE_MODEL ?? 'claude-sonnet-4-5';
const anthropic = createAnthropic({
  baseURL: `${process.env.ANTHROPIC_BASE_URL}/v1`,
  apiKey: process.env.ANTHROPIC_API_KEY,
});
const model = anthropic(MODEL);

const getWeather = tool({
  description: 'The weather in a city.',
  inputSchema: jsonSchema({
    type: 'object',
    properties: { city: { type: 'string', maxLength: 12 } },
    required: ['city'],
    additionalProperties: false,
  }),
  execute: async () => '18C and sunny',
});

const scenarios = {
  async create() {
    const result = await generateText({ model, prompt: 'Say hello.', maxOutputTokens: 16, maxRetries: 0 });
    return { text: result.text, finish_reason: result.finishReason, usage: result.usage, id: result.response.id };
  },

  async stream() {
    const errors = [];
    const result = streamText({
      model,
      prompt: 'Count to three.',
      maxOutputTokens: 16,
      maxRetries: 0,
      onError: ({ error }) => errors.push(String(error?.message ?? error)),
    });
    let text = '';
    for await (const delta of result.textStream) text += delta;
    return { text, final_text: await result.text, finish_reason: await result.finishReason, errors };
  },

  async tool() {
    // The forced call runs its tool, and the second step answers from the result.
    const result = await generateText({
      model,
      prompt: 'What is the weather in Paris?',
      tools: { get_weather: getWeather },
      toolChoice: { type: 'tool', toolName: 'get_weather' },
      prepareStep: ({ stepNumber }) => (stepNumber > 0 ? { toolChoice: 'none' } : {}),
      stopWhen: stepCountIs(2),
      maxOutputTokens: 128,
      maxRetries: 0,
      providerOptions: { anthropic: { disableParallelToolUse: true } },
    });
    return {
      steps: result.steps.map((step) => ({
        finish_reason: step.finishReason,
        tool_calls: step.toolCalls.map((call) => ({ name: call.toolName, input: call.input })),
        tool_results: step.toolResults.map((r) => r.output),
      })),
      finish_reason: result.finishReason,
      calls: result.steps.flatMap((step) => step.toolCalls.map((c) => ({ name: c.toolName, input: c.input }))),
    };
  },

  async structured() {
    const result = await generateText({
      model,
      prompt: 'Pick a colour and say whether it is warm.',
      output: Output.object({ schema: z.object({ colour: z.enum(['red', 'green', 'blue']), warm: z.boolean() }) }),
      maxOutputTokens: 128,
      maxRetries: 0,
    });
    return { parsed: result.output, finish_reason: result.finishReason };
  },

  async auth() {
    const wrong = createAnthropic({ baseURL: `${process.env.ANTHROPIC_BASE_URL}/v1`, apiKey: 'not-the-token' });
    try {
      await generateText({ model: wrong(MODEL), prompt: 'Hello?', maxOutputTokens: 8, maxRetries: 0 });
    } catch (error) {
      return {
        authentication_error: APICallError.isInstance(error) && error.statusCode === 401,
        status: error.statusCode,
        message: error.message,
      };
    }
    throw new Error('the request with a wrong key succeeded');
  },
};

try {
  console.log(JSON.stringify(await scenarios[process.argv[2]]()));
} catch (error) {
  console.log(
    JSON.stringify({
      error: {
        name: error?.constructor?.name,
        status: error?.statusCode,
        message: String(error?.message ?? error),
        cause: error?.cause ? String(error.cause?.message ?? error.cause) : undefined,
        response_body: error?.responseBody,
        text: error?.text,
      },
    }),
  );
  process.exitCode = 1;
}
