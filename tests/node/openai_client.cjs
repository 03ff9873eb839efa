// The official Node `openai` client against the gateway: prints one JSON object of what it got.
// Usage: OPENAI_MODULE=<path to node_modules/openai> node openai_client.cjs BASE_URL KEY
"use strict";
const { OpenAI } = require(process.env.OPENAI_MODULE);

const [baseURL, apiKey] = process.argv.slice(2);
const messages = [{ role: "user", content: "hello node" }];
const tool = {
  type: "function",
  function: {
    name: "get_weather",
    parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
  },
};

async function main() {
  const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
  const out = {};
  const answer = await client.chat.completions.create({ model: "gpt-4o-mini", messages });
  out.content = answer.choices[0].message.content;
  out.usage = answer.usage;

  const stream = await client.chat.completions.create({
    model: "gpt-4o-mini",
    messages,
    stream: true,
    stream_options: { include_usage: true },
  });
  out.streamed = "";
  for await (const chunk of stream) {
    if (chunk.choices.length) out.streamed += chunk.choices[0].delta.content || "";
    if (chunk.usage) out.stream_usage = chunk.usage;
  }

  // The client's own assembly of streamed tool calls (ChatCompletionStream).
  const runner = client.chat.completions.stream({ model: "gpt-4o-mini", messages, tools: [tool] });
  const final = await runner.finalChatCompletion();
  out.tool_calls = final.choices[0].message.tool_calls;
  out.tool_finish = final.choices[0].finish_reason;

  try {
    await new OpenAI({ baseURL, apiKey: "lgw-wrong", maxRetries: 0 }).models.list();
    out.bad_key = "accepted";
  } catch (err) {
    out.bad_key = { status: err.status, error: err.error };
  }
  const models = await client.models.list();
  out.models = models.data.map((m) => m.id);
  process.stdout.write(JSON.stringify(out));
}

main().catch((err) => {
  process.stderr.write(String(err && err.stack ? err.stack : err));
  process.exit(1);
});
