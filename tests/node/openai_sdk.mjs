// agentserve's /v1 through the official `openai` npm package, unchanged.
// Run by tests/integration/test_openai_api.py: AGENTSERVE_BASE_URL (".../v1") and
// AGENTSERVE_TOKEN (a JWT) in the environment; prints one JSON object of what it saw.
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: process.env.AGENTSERVE_BASE_URL,
  apiKey: process.env.AGENTSERVE_TOKEN,
  maxRetries: 0,
});
const question = [{ role: "user", content: "What is (12+30)*2?" }];

async function failure(promise) {
  try {
    await promise;
    return null;
  } catch (error) {
    return {
      class: error.constructor.name,
      status: error.status,
      type: error.type,
      code: error.code,
      param: error.param,
    };
  }
}

const models = [];
for await (const model of client.models.list()) {
  models.push(model.id);
}

const { data: plain, response } = await client.chat.completions
  .create({ model: "tools", messages: question })
  .withResponse();
const sessionId = response.headers.get("x-session-id");

const stream = await client.chat.completions.create({
  model: "tools",
  messages: question,
  stream: true,
  stream_options: { include_usage: true },
});
let streamed = "";
let last = null;
for await (const chunk of stream) {
  for (const choice of chunk.choices) {
    streamed += choice.delta.content ?? "";
  }
  last = chunk;
}

const continued = await client.chat.completions.create(
  { model: "tools", messages: [{ role: "user", content: "And the time in Asia/Tokyo?" }] },
  { headers: { "X-Session-ID": sessionId } },
);

console.log(
  JSON.stringify({
    models,
    answer: plain.choices[0].message.content,
    finish_reason: plain.choices[0].finish_reason,
    session_id: sessionId,
    agentserve: plain.agentserve,
    streamed,
    last_chunk: { choices: last.choices, usage: last.usage, agentserve: last.agentserve },
    continued_session: continued.agentserve.session_id,
    continued_steps: continued.agentserve.steps.map((step) => step.tool),
    unknown_model: await failure(
      client.chat.completions.create({ model: "nope", messages: question }),
    ),
    client_tools: await failure(
      client.chat.completions.create({
        model: "tools",
        messages: question,
        tools: [{ type: "function", function: { name: "f", parameters: {} } }],
      }),
    ),
    bad_token: await failure(
      new OpenAI({
        baseURL: process.env.AGENTSERVE_BASE_URL,
        apiKey: "not-a-jwt",
        maxRetries: 0,
      }).models.list(),
    ),
  }),
);
