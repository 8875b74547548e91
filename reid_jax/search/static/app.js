// The search page: a text or image query goes to POST /api/query; the hits come back as a grid of thumbnails.
// #results carries data-state (idle | loading | done | error) and each hit data-rank / data-score / data-path: what
// the page's test reads.
"use strict";

const $ = (id) => document.getElementById(id);
let latest = 0;  // the newest query: an older answer that arrives late is dropped

function setError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function options() {
  const camid = $("camid").value.trim();
  return { top: Number($("top").value), camid: camid === "" ? null : Number(camid) };
}

// url: /api/query with its query string; request: fetch's headers and body; label: what the status line names
async function search(url, request, label) {
  const id = ++latest;
  $("results").dataset.state = "loading";
  $("status").textContent = `searching ${label}…`;
  setError("");
  let data;
  try {
    const response = await fetch(url, { method: "POST", ...request });
    data = await response.json().catch(() => ({}));
    if (!response.ok && !data.error) data.error = `the server answered ${response.status} ${response.statusText}`;
  } catch (e) {
    data = { error: `no answer from the server (${e.message}); is it still running?` };
  }
  if (id !== latest) return;
  if (data.error) {
    $("status").textContent = "";
    setError(data.error);
    $("results").replaceChildren();
    $("results").dataset.state = "error";
    return;
  }
  show(data.hits);
  $("status").textContent = `${data.hits.length} results for ${label} (${Math.round(1000 * data.seconds)} ms)`;
  $("results").dataset.state = "done";
}

function element(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function show(hits) {
  const cards = hits.map((hit) => {
    const card = element("figure", "hit");
    Object.assign(card.dataset, { rank: hit.rank, score: hit.score, path: hit.path });
    const link = element("a");
    Object.assign(link, { href: hit.image, target: "_blank", rel: "noopener", title: "open the full image" });
    const img = element("img");
    Object.assign(img, { src: hit.thumb, alt: hit.path });
    link.append(img);
    const score = element("span", "score", hit.score.toFixed(3));
    score.title = "cosine similarity";
    const name = element("span", "name", hit.path.split("/").pop());
    name.title = hit.path;
    const caption = element("figcaption");
    caption.append(element("span", "rank", `#${hit.rank}`), score, name);
    card.append(link, caption);
    return card;
  });
  $("results").replaceChildren(...cards);
}

function searchText(event) {
  event.preventDefault();
  const text = $("text").value.trim();
  if (!text) { setError("type a description first"); return; }
  const body = JSON.stringify({ text, ...options() });
  search("/api/query", { headers: { "Content-Type": "application/json" }, body }, `“${text}”`);
}

// the image is the request body as it is (no multipart form); top and camid travel in the query string
function searchImage(event) {
  if (event) event.preventDefault();
  const file = $("image").files[0];
  if (!file) { setError("choose an image first"); return; }
  const { top, camid } = options();
  const query = new URLSearchParams({ top });
  if (camid !== null) query.set("camid", camid);
  const headers = { "Content-Type": file.type || "application/octet-stream" };
  search(`/api/query?${query}`, { headers, body: file }, file.name);
}

function chosen() {
  const file = $("image").files[0];
  if ($("preview").src) URL.revokeObjectURL($("preview").src);
  $("preview").hidden = !file;
  $("image-go").disabled = !file;
  if (!file) return;
  $("preview").src = URL.createObjectURL(file);
  searchImage();
}

async function describe() {
  try {
    const info = await (await fetch("/api/info")).json();
    const kinds = info.has_text ? "text and image queries" : "image queries only";
    $("about").textContent = `${info.count} images in ${info.root} · model: ${info.kind} · ${kinds}`;
    if (!info.has_text) $("text").placeholder = "this model answers image queries only";
  } catch (e) {
    $("about").textContent = "the server does not answer; is it still running?";
  }
}

$("text-form").addEventListener("submit", searchText);
$("image-form").addEventListener("submit", searchImage);
$("image").addEventListener("change", chosen);
describe();
