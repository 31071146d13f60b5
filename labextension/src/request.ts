import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** Call an endpoint of the burla server extension (burla_jupyter/routes.py), with Jupyter's authentication. */
export async function requestAPI<T>(endPoint = '', init: RequestInit = {}): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'burla', endPoint);
  const response = await ServerConnection.makeRequest(url, init, settings);
  const text = await response.text();
  const data = text.length > 0 ? JSON.parse(text) : {};
  if (!response.ok) {
    throw new ServerConnection.ResponseError(response, data.message || text);
  }
  return data as T;
}

/** The push channel: every message the server sends goes to onMessage; it reconnects when the server restarts. */
export function openEvents(onMessage: (data: unknown) => void, onStatus: (open: boolean) => void): () => void {
  const settings = ServerConnection.makeSettings();
  let url = URLExt.join(settings.wsUrl, 'burla', 'events');
  if (settings.token && settings.appendToken) {
    url += `?token=${encodeURIComponent(settings.token)}`;
  }
  let socket: WebSocket | null = null;
  let closed = false;
  let delay = 500;
  const connect = () => {
    socket = new settings.WebSocket(url);
    socket.onopen = () => {
      delay = 500;
      onStatus(true);
    };
    socket.onmessage = event => onMessage(JSON.parse(event.data));
    socket.onclose = () => {
      onStatus(false);
      if (!closed) {
        setTimeout(connect, delay);
        delay = Math.min(delay * 2, 10000);
      }
    };
  };
  connect();
  return () => {
    closed = true;
    socket?.close();
  };
}
