// The playground: one streamed generation through the proxy, each partial image painted
// as its event arrives, then the final one, then its cost from the ledger. The client key
// typed here stays in this page's memory: it goes only to the proxy, in a header.
const form = document.getElementById("playground");
const image = document.getElementById("image");
const status = document.getElementById("status");
const events = document.getElementById("events");
const cost = document.getElementById("cost");

function note(kind, text) {
  const item = document.createElement("li");
  item.dataset.kind = kind;
  item.textContent = text;
  events.append(item);
}

function paint(data, kind) {
  const format = data.output_format || "png";
  image.src = `data:image/${format};base64,${data.b64_json}`;
  image.hidden = false;
  image.dataset.kind = kind;
}

function handle(block) {
  let name = "message";
  const lines = [];
  for (const line of block.split(/\r?\n/)) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) lines.push(line.slice(5).replace(/^ /, ""));
  }
  if (!lines.length) return;
  const data = JSON.parse(lines.join("\n"));
  const type = data.type || name;
  if (type.endsWith("partial_image")) {
    paint(data, "partial");
    note("partial", `partial image ${data.partial_image_index + 1}`);
    status.textContent = `Partial image ${data.partial_image_index + 1}…`;
  } else if (type.endsWith("completed")) {
    paint(data, "final");
    note("completed", "final image");
    status.textContent = "Done.";
  } else if (type === "error") {
    note("error", data.error?.message || "error");
    status.textContent = `Failed: ${data.error?.message || "error"}`;
  }
}

async function showCost(requestId) {
  if (!requestId) return;
  const answer = await fetch(form.dataset.ledger + encodeURIComponent(requestId) + ".json");
  if (!answer.ok) return;
  const line = await answer.json();
  cost.textContent = line.cost === null ? "Cost: unpriced" : `Cost: ${line.cost}`;
  cost.dataset.costUsd = line.cost_usd ?? "";
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const fields = new FormData(form);
  events.replaceChildren();
  cost.textContent = "";
  image.hidden = true;
  status.textContent = "Sending…";
  const headers = { "content-type": "application/json" };
  if (fields.get("key")) headers.authorization = `Bearer ${fields.get("key")}`;
  const body = {
    model: fields.get("model"),
    prompt: fields.get("prompt"),
    size: fields.get("size"),
    n: 1,
    stream: true,
    partial_images: Number(fields.get("partial_images")),
  };
  let response;
  try {
    response = await fetch(form.dataset.endpoint, { method: "POST", headers, body: JSON.stringify(body) });
  } catch (error) {
    status.textContent = `Failed: ${error}`;
    return;
  }
  if (!response.ok) {
    const answer = await response.json().catch(() => ({}));
    status.textContent = `Refused (${response.status}): ${answer.error?.message || response.statusText}`;
    return;
  }
  status.textContent = "Generating…";
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      handle(block);
    }
  }
  if (buffer.trim()) handle(buffer);
  await showCost(response.headers.get("x-imagegen-request-id"));
});
