// The playground's script (served as a file: the server's Content-Security-Policy allows no inline script).
"use strict";
const $ = (id) => document.getElementById(id);

// The API key lives in this variable only: never stored, never put in a URL; sent as the Bearer header.
let apiKey = "";

function headers(extra) {
  return apiKey ? { ...extra, Authorization: `Bearer ${apiKey}` } : { ...extra };
}

function loadInfo() {
  fetch("/info", { headers: headers({}) }).then((r) => r.json()).then((info) => {
    $("meta").textContent = info.error ? info.error :
      `${info.model} · mask token ${info.mask_token} · max length ${info.max_length} · ${info.precision}`;
  }).catch(() => { $("meta").textContent = "model information unavailable"; });
}

$("key").addEventListener("input", () => { apiKey = $("key").value.trim(); });
$("key").addEventListener("change", loadInfo);
loadInfo();

function render(result) {
  // one list per mask when the text has several masks, as pipeline("fill-mask") returns
  const perMask = Array.isArray(result[0]) ? result : [result];
  const box = $("candidates");
  box.replaceChildren();
  const best = perMask.map((preds) => preds[0]);
  const filled = $("filled");
  filled.replaceChildren();
  if (perMask.length === 1) {
    filled.textContent = best[0].sequence;
  } else {
    filled.textContent = "Top candidate per mask: " + best.map((p) => p.token_str.trim()).join(" · ");
  }
  perMask.forEach((preds, i) => {
    if (perMask.length > 1) {
      const t = document.createElement("div");
      t.className = "mask-title";
      t.textContent = `mask ${i + 1}`;
      box.appendChild(t);
    }
    const top = preds[0].score || 1;
    for (const p of preds) {
      const row = document.createElement("div");
      row.className = "row candidate";
      const token = document.createElement("span");
      token.className = "token";
      token.textContent = p.token_str;
      const barCell = document.createElement("div");
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.width = `${Math.max(0.5, (100 * p.score) / top)}%`;
      barCell.appendChild(bar);
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = (100 * p.score).toFixed(1) + "%";
      row.append(token, barCell, score);
      box.appendChild(row);
    }
  });
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("error").textContent = "";
  $("submit").disabled = true;
  try {
    const r = await fetch("/fill", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ text: $("text").value, top_k: Number($("topk").value) }),
    });
    const body = await r.json();
    if (!r.ok) {
      $("error").textContent = body.error || `error ${r.status}`;
      $("candidates").replaceChildren();
      $("filled").replaceChildren();
    } else {
      render(body);
    }
  } catch (e) {
    $("error").textContent = String(e);
  } finally {
    $("submit").disabled = false;
  }
});
