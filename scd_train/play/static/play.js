// scd-play page: draws the frames the server streams and sends key presses and commands back.
// Frames arrive as one binary WebSocket message each: a 4-byte big-endian header length, the
// JSON header, then height*width*3 RGB bytes per panel. Everything else is JSON text.
"use strict";

const TARGET_HEIGHT = 384;  // panels are enlarged (nearest neighbour) to about this many pixels

const $ = (id) => document.getElementById(id);
const play = {
  socket: null,
  info: null,
  keyToAction: new Map(),
  held: new Set(),
  seq: 0,
  paused: false,
  recording: false,
  refused: false,
  canvases: [],
  // for whoever watches the page (people and tests): what arrived and when
  stats: { frames: 0, generated: 0, arrivals: [], checksums: [], headers: [], lastHeader: null, notices: [] },
};
window.scdPlay = play;

function send(message) {
  if (play.socket && play.socket.readyState === WebSocket.OPEN) {
    play.socket.send(JSON.stringify(message));
  }
}

function showNotice(text, kind) {
  const box = $("notice");
  box.textContent = text;
  box.className = kind || "";
  box.hidden = !text;
  if (text) play.stats.notices.push({ kind: kind || "", text });
}

function normalizeKey(key) {
  return key.length === 1 ? key.toLowerCase() : key;
}

function buildScreens(info) {
  const screens = $("screens");
  screens.replaceChildren();
  play.canvases = [];
  const scale = Math.max(1, Math.floor(TARGET_HEIGHT / info.height));
  for (const label of info.panels) {
    const figure = document.createElement("figure");
    const canvas = document.createElement("canvas");
    canvas.width = info.width * scale;
    canvas.height = info.height * scale;
    const source = document.createElement("canvas");  // native size; drawn enlarged onto `canvas`
    source.width = info.width;
    source.height = info.height;
    const caption = document.createElement("figcaption");
    caption.textContent = label;
    figure.append(canvas, caption);
    screens.append(figure);
    play.canvases.push({ canvas, source, image: source.getContext("2d").createImageData(info.width, info.height) });
  }
}

function buildKeys(actions) {
  const body = $("keys").tBodies[0];
  body.replaceChildren();
  play.keyToAction.clear();
  for (const entry of actions.keys) {
    for (const key of entry.keys) play.keyToAction.set(key, entry.action);
    const row = body.insertRow();
    row.dataset.action = entry.action;
    const keyCell = row.insertCell();
    keyCell.className = "key";
    keyCell.textContent = entry.label || "(script only)";
    row.insertCell().textContent = entry.name;
  }
  const none = actions.names.length === 0;
  $("no-actions").hidden = !none;
  $("idle").textContent = none ? "" : `no key: ${actions.idle_label}. Names from ${actions.source}.`;
}

function onHello(info) {
  play.info = info;
  $("run").textContent = `${info.run} · ${info.panels.join(" | ")}`;
  $("connection").textContent = info.endless ? "endless (windowed encoder)" : `up to ${info.max_frames} frames per context`;
  $("steps").value = info.steps;
  const rate = $("rate");
  if (![...rate.options].some((o) => Number(o.value) === info.fps_target)) {
    rate.add(new Option(`${info.fps_target} fps`, String(info.fps_target)));  // the server's --fps
  }
  rate.value = String(info.fps_target);
  $("record").disabled = !info.recording;
  buildScreens(info);
  buildKeys(info.actions);
  if (info.actions.names.length === 0) {
    showNotice("This model takes no actions: it plays with the null action only.", "info");
  }
}

function checksum(bytes) {
  let hash = 2166136261;
  for (let i = 0; i < bytes.length; i += 1) hash = Math.imul(hash ^ bytes[i], 16777619) >>> 0;
  return hash;
}

function drawPanel(panel, rgb) {
  const rgba = panel.image.data;
  for (let i = 0, j = 0; i < rgb.length; i += 3, j += 4) {
    rgba[j] = rgb[i];
    rgba[j + 1] = rgb[i + 1];
    rgba[j + 2] = rgb[i + 2];
    rgba[j + 3] = 255;
  }
  panel.source.getContext("2d").putImageData(panel.image, 0, 0);
  const ctx = panel.canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(panel.source, 0, 0, panel.canvas.width, panel.canvas.height);
}

function onFrame(buffer) {
  const view = new DataView(buffer);
  const length = view.getUint32(0);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, length)));
  const pixels = new Uint8Array(buffer, 4 + length);
  const size = header.height * header.width * 3;
  header.panels.forEach((_, i) => {
    if (play.canvases[i]) drawPanel(play.canvases[i], pixels.subarray(i * size, (i + 1) * size));
  });
  const stats = play.stats;
  const now = performance.now();
  stats.frames += 1;
  stats.lastHeader = header;
  stats.checksums.push(checksum(pixels));
  stats.headers.push({ index: header.index, generated: header.generated, clip: header.clip, action: header.action });
  if (stats.checksums.length > 64) stats.checksums.shift();
  if (stats.headers.length > 64) stats.headers.shift();
  if (header.generated) {
    stats.generated += 1;
    stats.arrivals.push(now);
    while (stats.arrivals.length && now - stats.arrivals[0] > 1000) stats.arrivals.shift();
  }
  showReadout(header);
}

function showReadout(header) {
  const arrivals = play.stats.arrivals;
  if (arrivals.length >= 2) {
    const fps = (arrivals.length - 1) / ((arrivals[arrivals.length - 1] - arrivals[0]) / 1000);
    $("fps").textContent = fps.toFixed(1);
  }
  const ms = (v) => v.toFixed(1);
  const first = header.panels[0];
  $("ms").textContent = `per frame: ${ms(header.tick_ms)} ms · encoder ${ms(first.encoder_ms)} ms + decoder `
    + `${ms(first.decoder_ms)} ms (${header.steps} step${header.steps === 1 ? "" : "s"}) + render ${ms(first.render_ms)} ms`;
  $("panel-ms").textContent = header.panels.length > 1 ? header.panels.map((p) => {
    const total = p.encoder_ms + p.decoder_ms + p.render_ms;
    return `${p.label}: ${ms(total)} ms/frame (${total > 0 ? (1000 / total).toFixed(0) : "–"} frames/s alone)`;
  }).join(" · ") : "";
  $("frame-index").textContent = header.index;
  $("frames-left").textContent = header.frames_left === null ? "" : `(${header.frames_left} left)`;
  $("frame-action").textContent = header.generated ? header.action_name : "(context)";
  $("frame-clip").textContent = header.clip;
  for (const row of $("keys").tBodies[0].rows) {
    row.classList.toggle("pressed", header.generated && Number(row.dataset.action) === header.action);
  }
  if (document.activeElement !== $("steps")) $("steps").value = header.steps;
}

function onMessage(message) {
  switch (message.type) {
    case "hello": onHello(message); break;
    case "refused":
      play.refused = true;
      showNotice(message.text, "refused");
      for (const button of document.querySelectorAll("button")) button.disabled = true;
      break;
    case "state":
      play.paused = message.paused;
      play.recording = message.recording;
      $("pause").textContent = message.paused ? "Resume" : "Pause";
      $("pause").classList.toggle("active", message.paused);
      $("record").textContent = message.recording ? "Stop recording" : "Record";
      $("record").classList.toggle("active", message.recording);
      if (document.activeElement !== $("steps")) $("steps").value = message.steps;
      break;
    case "notice": showNotice(message.text, message.kind); break;
    case "recording": {
      const list = $("recordings");
      list.hidden = false;
      const link = document.createElement("a");
      link.href = message.url;
      link.textContent = `${message.url.split("/").pop()} (${message.frames} frames)`;
      const item = document.createElement("li");
      item.append(link);
      list.querySelector("ul").append(item);
      break;
    }
    default: break;
  }
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${location.host}/ws`);
  socket.binaryType = "arraybuffer";
  socket.onmessage = (event) => {
    if (typeof event.data === "string") onMessage(JSON.parse(event.data));
    else onFrame(event.data);
  };
  socket.onopen = () => { $("connection").textContent = "connected"; };
  socket.onclose = () => {
    $("connection").textContent = "disconnected";
    if (!play.refused) showNotice("The connection to scd-play closed. Reload the page once the server runs.", "error");
  };
  play.socket = socket;
}

function releaseAll() {
  for (const action of play.held) send({ type: "release", action, seq: ++play.seq });
  play.held.clear();
}

document.addEventListener("keydown", (event) => {
  if (event.target instanceof HTMLInputElement) return;
  const action = play.keyToAction.get(normalizeKey(event.key));
  if (action === undefined) return;
  event.preventDefault();
  if (event.repeat || play.held.has(action)) return;  // held keys stay pressed on the server
  play.held.add(action);
  send({ type: "press", action, seq: ++play.seq });
});

document.addEventListener("keyup", (event) => {
  const action = play.keyToAction.get(normalizeKey(event.key));
  if (action === undefined || !play.held.has(action)) return;
  event.preventDefault();
  play.held.delete(action);
  send({ type: "release", action, seq: ++play.seq });
});

window.addEventListener("blur", releaseAll);
// a clicked button keeps the focus, and space would click it again instead of reaching the model
for (const button of document.querySelectorAll("button")) button.addEventListener("click", () => button.blur());
$("pause").addEventListener("click", () => send({ type: "pause", on: !play.paused }));
$("reset").addEventListener("click", () => { showNotice(""); send({ type: "reset" }); });
$("record").addEventListener("click", () => send({ type: "record", on: !play.recording }));
$("steps").addEventListener("change", () => {
  const value = Number($("steps").value);
  if (Number.isInteger(value) && value >= 1 && value <= 1000) send({ type: "steps", value });
});
$("rate").addEventListener("change", () => send({ type: "rate", fps: Number($("rate").value) }));

connect();
